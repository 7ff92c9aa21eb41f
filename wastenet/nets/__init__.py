"""Network definitions (torch): ResNet-18..152 with CBAM attention, IBN-a and BNNeck, and
the tutorials' baselines VGG-16 (BN), MobileNetV2 and AlexNet under torchvision's names."""

from wastenet.nets.build import build_model, count_parameters, list_architectures
from wastenet.nets.cbam import (
    CBAM,
    GATE_START,
    START_SCALE,
    ChannelGate,
    SpatialGate,
    record_gates,
)
from wastenet.nets.common import Classifier
from wastenet.nets.heads import BNNeck
from wastenet.nets.ibn import IBN
from wastenet.nets.pretrained import (
    PretrainedReport,
    PretrainedWeightsError,
    find_pretrained,
    load_pretrained,
)
from wastenet.nets.resnet import BasicBlock, Bottleneck, ResNet
from wastenet.schema import IMAGENET_MEAN, IMAGENET_STD, ModelConfig

__all__ = [
    "CBAM",
    "GATE_START",
    "IBN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "START_SCALE",
    "BNNeck",
    "BasicBlock",
    "Bottleneck",
    "ChannelGate",
    "Classifier",
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
    "record_gates",
]
