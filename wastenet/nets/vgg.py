"""VGG-16 with BatchNorm and CBAM after convolutional stages, after torchvision's ``vgg.py``.

Layer names equal torchvision's (``features.<i>``, ``classifier.<i>``), so a torchvision
``vgg16_bn`` state dict loads by name. Attention takes the slot of the ReLU that ends a
stage (``features.<i>.attn``, see ``WithAttention``), so no pretrained name moves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wastenet.nets.common import (
    AttnLayer,
    Classifier,
    WithAttention,
    attention_layer,
    fold_after_relu,
    make_head,
    reset_own_modules,
)
from wastenet.schema import ModelConfig

# Configuration "D": channels per 3x3 convolution, "M" a 2x2 max pool ending a stage.
VGG16: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
VGG16 += [512, 512, 512, "M", 512, 512, 512, "M"]
STAGE_PARTS = ("stem", "layer1", "layer2", "layer3", "layer4")


def make_layers(
    cfg: list[int | str], attn_layer: AttnLayer | None, attn_stages: frozenset[int]
) -> tuple[nn.Sequential, list[int]]:
    """(features, index of the first layer of each stage); stage 0 is the stem."""
    layers: list[nn.Module] = []
    starts = [0]
    in_channels = 3
    for v in cfg:
        if v == "M":
            stage = len(starts) - 1
            if attn_layer is not None and stage in attn_stages:
                layers[-1] = WithAttention(layers[-1], attn_layer(in_channels))
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            starts.append(len(layers))
            continue
        assert isinstance(v, int)
        conv = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers), starts[:-1]


class VGG(Classifier):
    """VGG with BatchNorm; ``attn_stages`` (1-4) get CBAM after their last ReLU."""

    head_name = "classifier.6"

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 1000,
        attn_layer: AttnLayer | None = None,
        attn_stages: frozenset[int] = frozenset(),
        head: str = "linear",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features, self.stage_starts = make_layers(cfg, attn_layer, attn_stages)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            make_head(4096, num_classes, head),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        reset_own_modules(self)  # the loop above also reached into CBAM and BNNeck

    def module_parts(self) -> dict[str, str]:
        ends = [*self.stage_starts[1:], len(self.features)]
        parts = {
            f"features.{i}": part
            for part, start, end in zip(STAGE_PARTS, self.stage_starts, ends, strict=True)
            for i in range(start, end)
        }
        # The pretrained hidden layers of the classifier go with the last stage; only the
        # class layer is new.
        return parts | {"classifier.0": "layer4", "classifier.3": "layer4", "classifier.6": "head"}

    def fold_attention_start(self) -> list[str]:
        return fold_after_relu(self.features)  # conv -> BatchNorm -> ReLU -> CBAM

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def vgg16_bn(config: ModelConfig) -> VGG:
    """VGG-16 with BatchNorm; ``cbam='stage'`` puts CBAM after convolutional stages 2-5."""
    return VGG(
        VGG16,
        num_classes=config.num_classes,
        attn_layer=attention_layer(config),
        attn_stages=config.attention_stages,
        head=config.head,
    )
