"""AlexNet with CBAM after convolutions, after torchvision's ``alexnet.py``.

Layer names equal torchvision's, so a torchvision ``alexnet`` state dict loads by name.
The five convolutions are the stem (conv1) and layer groups 1-4 (conv2..conv5); ``stage``
attention takes the slot of the ReLU after a group's convolution (``features.<i>.attn``).
Inputs need at least 63 pixels (three 3x3/2 poolings after a stride-4 convolution).
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

# features index of each part's ReLU: conv2 -> 4, conv3 -> 7, conv4 -> 9, conv5 -> 11.
STAGE_RELU = {1: 4, 2: 7, 3: 9, 4: 11}
FEATURE_PARTS = {0: "stem", 1: "stem", 2: "stem", 3: "layer1", 4: "layer1", 5: "layer1"}
FEATURE_PARTS |= {6: "layer2", 7: "layer2", 8: "layer3", 9: "layer3"}
FEATURE_PARTS |= {10: "layer4", 11: "layer4", 12: "layer4"}


class AlexNet(Classifier):
    head_name = "classifier.6"

    def __init__(
        self,
        num_classes: int = 1000,
        attn_layer: AttnLayer | None = None,
        attn_stages: frozenset[int] = frozenset(),
        head: str = "linear",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        for stage in sorted(attn_stages):
            assert attn_layer is not None
            relu = STAGE_RELU[stage]
            conv = self.features[relu - 1]
            assert isinstance(conv, nn.Conv2d)
            self.features[relu] = WithAttention(self.features[relu], attn_layer(conv.out_channels))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            make_head(4096, num_classes, head),
        )
        reset_own_modules(self)

    def module_parts(self) -> dict[str, str]:
        parts = {f"features.{i}": part for i, part in FEATURE_PARTS.items()}
        # The pretrained hidden layers of the classifier go with the last convolution; only
        # the class layer is new.
        return parts | {"classifier.1": "layer4", "classifier.4": "layer4", "classifier.6": "head"}

    def fold_attention_start(self) -> list[str]:
        return fold_after_relu(self.features)  # conv -> ReLU -> CBAM

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def alexnet(config: ModelConfig) -> AlexNet:
    """AlexNet; ``cbam='stage'`` puts CBAM after conv2..conv5 (the selected groups)."""
    return AlexNet(
        num_classes=config.num_classes,
        attn_layer=attention_layer(config),
        attn_stages=config.attention_stages,
        head=config.head,
    )
