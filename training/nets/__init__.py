"""Network definitions: ResNet-18..152 with CBAM attention, IBN-a and BNNeck (torch-only)."""

from training.nets.cbam import CBAM, GATE_INIT, ChannelGate, SpatialGate
from training.nets.config import ModelConfig
from training.nets.finetune import (
    BACKBONE_PARTS,
    GROUPS,
    PARTS,
    count_parameters,
    freeze,
    named_parts,
    param_groups,
    set_trainable,
    trainable_parts,
    unfreeze,
)
from training.nets.heads import BNNeck
from training.nets.ibn import IBN
from training.nets.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainedReport,
    PretrainedWeightsError,
    find_pretrained,
    load_pretrained,
)
from training.nets.resnet import BasicBlock, Bottleneck, ResNet, build_model, list_architectures

__all__ = [
    "BACKBONE_PARTS",
    "CBAM",
    "GATE_INIT",
    "GROUPS",
    "IBN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PARTS",
    "BNNeck",
    "BasicBlock",
    "Bottleneck",
    "ChannelGate",
    "ModelConfig",
    "PretrainedReport",
    "PretrainedWeightsError",
    "ResNet",
    "SpatialGate",
    "build_model",
    "count_parameters",
    "find_pretrained",
    "freeze",
    "list_architectures",
    "load_pretrained",
    "named_parts",
    "param_groups",
    "set_trainable",
    "trainable_parts",
    "unfreeze",
]
