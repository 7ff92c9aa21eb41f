"""MobileNetV2 with injectable attention, after torchvision's ``mobilenetv2.py``.

Layer names equal torchvision's (``features.<i>.conv.<j>``, ``classifier.1``), so a
torchvision ``mobilenet_v2`` state dict loads by name. The inverted-residual blocks take
``attn_layer`` like the ResNet blocks: on the branch before the addition (``attn``) or
after it (``post_attn``). Layer groups 1-4 are the blocks at output stride 4, 8, 16 and 32;
the stem is the first convolution and the first block, and the last 1x1 convolution
(1280 channels) belongs to layer4.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from wastenet.nets.cbam import CBAM
from wastenet.nets.common import (
    AttnLayer,
    Classifier,
    attention_layer,
    fold_into_input,
    fold_into_successor,
    make_head,
    reset_own_modules,
)
from wastenet.schema import ModelConfig

# t (expansion), c (channels), n (blocks), s (stride of the first block), layer group
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1, 0),
    (6, 24, 2, 2, 1),
    (6, 32, 3, 2, 2),
    (6, 64, 4, 2, 3),
    (6, 96, 3, 1, 3),
    (6, 160, 3, 2, 4),
    (6, 320, 1, 1, 4),
]
GROUP_PARTS = ("stem", "layer1", "layer2", "layer3", "layer4")


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); identity added when shapes allow."""

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        attn: nn.Module | None = None,
        post_attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(
                Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6)
            )
        layers += [
            Conv2dNormActivation(
                hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6
            ),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.attn = attn or nn.Identity()
        self.post_attn = post_attn or nn.Identity()
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        out = self.attn(out)
        if self.use_res_connect:
            out = out + x
        out = self.post_attn(out)
        return out


class MobileNetV2(Classifier):
    """MobileNetV2 (width 1.0). ``block_attn`` groups get attention in every block (on the
    branch, or after the addition with ``attn_position='post'``); ``stage_attn`` groups get
    one after their last block."""

    head_name = "classifier.1"

    def __init__(
        self,
        num_classes: int = 1000,
        attn_layer: AttnLayer | None = None,
        stage_attn: frozenset[int] = frozenset(),
        block_attn: frozenset[int] = frozenset(),
        attn_position: str = "branch",
        head: str = "linear",
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = [
            Conv2dNormActivation(3, 32, stride=2, activation_layer=nn.ReLU6)
        ]
        self.groups = [0]  # layer group of each features entry
        inp = 32
        for t, c, n, s, group in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                attn = post = None
                if attn_layer is not None and group in block_attn:
                    if attn_position == "post":
                        post = attn_layer(c)
                    else:
                        attn = attn_layer(c)
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t, attn, post))
                self.groups.append(group)
                inp = c
        features.append(Conv2dNormActivation(inp, 1280, kernel_size=1, activation_layer=nn.ReLU6))
        self.groups.append(4)
        self.features = nn.Sequential(*features)
        self._add_stage_attention(attn_layer, stage_attn)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), make_head(1280, num_classes, head))
        self._init_weights()

    def _add_stage_attention(self, attn_layer: AttnLayer | None, stages: frozenset[int]) -> None:
        for stage in sorted(stages):
            assert attn_layer is not None
            last = max(i for i, g in enumerate(self.groups) if g == stage and self._is_block(i))
            block = self.features[last]
            assert isinstance(block, InvertedResidual)
            block.post_attn = attn_layer(block.out_channels)

    def _is_block(self, index: int) -> bool:
        return isinstance(self.features[index], InvertedResidual)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        reset_own_modules(self)  # the loop above also reached into CBAM and BNNeck

    def module_parts(self) -> dict[str, str]:
        parts = {f"features.{i}": GROUP_PARTS[g] for i, g in enumerate(self.groups)}
        return parts | {"classifier.1": "head"}

    def fold_attention_start(self) -> list[str]:
        unfolded: list[str] = []
        blocks = list(self.features)
        for i, block in enumerate(blocks):
            if not isinstance(block, InvertedResidual):
                continue
            if isinstance(block.attn, CBAM):
                fold_into_input(block.conv[-1])
            if not isinstance(block.post_attn, CBAM):
                continue
            reader = blocks[i + 1]
            if not block.use_res_connect:
                fold_into_input(block.conv[-1])  # no addition: the projection BN feeds it
            elif isinstance(reader, InvertedResidual) and not reader.use_res_connect:
                # Only the reader's first convolution reads it: fold into that BatchNorm.
                fold_into_successor([reader.conv.get_submodule("0.1")])
            else:
                unfolded.append(f"features.{i}.post_attn")
        return unfolded

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v2(config: ModelConfig) -> MobileNetV2:
    """MobileNetV2; CBAM placements as for ResNet, over its four layer groups."""
    stages = config.attention_stages
    return MobileNetV2(
        num_classes=config.num_classes,
        attn_layer=attention_layer(config),
        stage_attn=stages if config.cbam == "stage" else frozenset(),
        block_attn=stages if config.cbam in ("block", "block_post") else frozenset(),
        attn_position="post" if config.cbam == "block_post" else "branch",
        head=config.head,
    )
