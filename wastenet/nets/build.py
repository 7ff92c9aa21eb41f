"""Build any network of ``ModelConfig.arch`` by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

from torch import nn

from wastenet.nets.alexnet import alexnet
from wastenet.nets.common import Classifier
from wastenet.nets.mobilenet import mobilenet_v2
from wastenet.nets.resnet import RESNET_LAYERS, resnet
from wastenet.nets.vgg import vgg16_bn
from wastenet.schema import Arch, ModelConfig

BUILDERS: dict[str, Callable[[ModelConfig], Classifier]] = {
    **{name: resnet for name in RESNET_LAYERS},
    "vgg16_bn": vgg16_bn,
    "mobilenet_v2": mobilenet_v2,
    "alexnet": alexnet,
}


def list_architectures() -> list[str]:
    """Network names accepted by ``ModelConfig.arch``."""
    return list(get_args(Arch))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(config: ModelConfig) -> Classifier:
    """A randomly initialised network for ``config`` (see ``load_pretrained``)."""
    return BUILDERS[config.arch](config)
