"""Network definitions: ResNet-18..152 with CBAM attention, IBN-a and BNNeck (torch)."""

from wastenet.nets.cbam import CBAM, GATE_INIT, ChannelGate, SpatialGate
from wastenet.nets.heads import BNNeck
from wastenet.nets.ibn import IBN
from wastenet.nets.pretrained import (
    PretrainedReport,
    PretrainedWeightsError,
    find_pretrained,
    load_pretrained,
)
from wastenet.nets.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    build_model,
    count_parameters,
    list_architectures,
)
from wastenet.schema import IMAGENET_MEAN, IMAGENET_STD, ModelConfig

__all__ = [
    "CBAM",
    "GATE_INIT",
    "IBN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
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
    "list_architectures",
    "load_pretrained",
]
