"""ResNet with injectable attention, after torchvision's ``resnet.py``.

Layer names follow torchvision (conv1, bn1, layer1..layer4, fc), so torchvision state
dicts map by name. Attention is an injected layer: blocks take ``attn_layer`` (a factory
``channels -> nn.Module``) and put it on the residual branch or after the addition.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

from torch import Tensor, nn

from wastenet.nets.cbam import CBAM
from wastenet.nets.heads import BNNeck
from wastenet.nets.ibn import IBN
from wastenet.schema import ModelConfig

AttnLayer = Callable[[int], nn.Module]
NormLayer = Callable[[int], nn.Module]
AttnPosition = Literal["branch", "post"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _attn_slots(
    attn_layer: AttnLayer | None, position: AttnPosition, channels: int
) -> tuple[nn.Module, nn.Module]:
    """(branch attention, post-addition attention); the unused slot is an Identity."""
    if attn_layer is None:
        return nn.Identity(), nn.Identity()
    if position == "branch":
        return attn_layer(channels), nn.Identity()
    return nn.Identity(), attn_layer(channels)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        first_norm_layer: NormLayer | None = None,
        attn_layer: AttnLayer | None = None,
        attn_position: AttnPosition = "branch",
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = (first_norm_layer or norm_layer)(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.attn, self.post_attn = _attn_slots(attn_layer, attn_position, planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.attn(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out = out + identity
        out = self.post_attn(out)
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        first_norm_layer: NormLayer | None = None,
        attn_layer: AttnLayer | None = None,
        attn_position: AttnPosition = "branch",
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = (first_norm_layer or norm_layer)(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.attn, self.post_attn = _attn_slots(attn_layer, attn_position, planes * self.expansion)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)
        out = self.attn(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out = out + identity
        out = self.post_attn(out)
        out = self.relu(out)
        return out


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet backbone with optional attention per stage, per block, or after each addition.

    ``stage_attn`` puts one ``attn_layer`` after each of the listed layer groups;
    ``block_attn`` puts one inside every block of the listed layer groups, on the residual
    branch (``attn_position='branch'``) or after the addition (``'post'``). ``ibn_stages``
    swap ``bn1`` of every block in those groups for IBN-a.
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        attn_layer: AttnLayer | None = None,
        stage_attn: frozenset[int] = frozenset(),
        block_attn: frozenset[int] = frozenset(),
        attn_position: AttnPosition = "branch",
        ibn_stages: frozenset[int] = frozenset(),
        head: Literal["linear", "bnneck"] = "linear",
    ) -> None:
        super().__init__()
        if (stage_attn or block_attn) and attn_layer is None:
            raise ValueError("stage_attn/block_attn given without an attn_layer")
        self.inplanes = 64

        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        def make(stage: int, planes: int, stride: int) -> tuple[nn.Sequential, nn.Module]:
            group = self._make_layer(
                block,
                planes,
                layers[stage - 1],
                stride=stride,
                attn_layer=attn_layer if stage in block_attn else None,
                attn_position=attn_position,
                ibn=stage in ibn_stages,
            )
            after = attn_layer(self.inplanes) if attn_layer and stage in stage_attn else None
            return group, after if after is not None else nn.Identity()

        self.layer1, self.attn1 = make(1, 64, 1)
        self.layer2, self.attn2 = make(2, 128, 2)
        self.layer3, self.attn3 = make(3, 256, 2)
        self.layer4, self.attn4 = make(4, 512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc: nn.Module = (
            BNNeck(self.num_features, num_classes)
            if head == "bnneck"
            else nn.Linear(self.num_features, num_classes)
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) and m.affine:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # The loop above reset the gates' BatchNorm; restore their near-identity start.
        for m in self.modules():
            if isinstance(m, CBAM):
                m.reset_gates()

    def _make_layer(
        self,
        block: Block,
        planes: int,
        blocks: int,
        stride: int,
        attn_layer: AttnLayer | None,
        attn_position: AttnPosition,
        ibn: bool,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        first_norm = IBN if ibn else None
        layers: list[nn.Module] = [
            block(
                self.inplanes,
                planes,
                stride,
                downsample,
                first_norm_layer=first_norm,
                attn_layer=attn_layer,
                attn_position=attn_position,
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    first_norm_layer=first_norm,
                    attn_layer=attn_layer,
                    attn_position=attn_position,
                )
            )
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features before the head, shape (N, num_features)."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.attn1(x)
        x = self.layer2(x)
        x = self.attn2(x)
        x = self.layer3(x)
        x = self.attn3(x)
        x = self.layer4(x)
        x = self.attn4(x)

        x = self.avgpool(x)
        x = x.flatten(1)
        return x

    def forward(self, x: Tensor) -> Tensor:
        features = self.forward_features(x)
        logits: Tensor = self.fc(features)
        return logits


_ARCHS: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
IBN_STAGES = frozenset({1, 2, 3})


def list_architectures() -> list[str]:
    """Backbone names accepted by ``ModelConfig.arch``."""
    return list(_ARCHS)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(config: ModelConfig) -> ResNet:
    """Build a randomly initialised network for ``config`` (see ``load_pretrained``)."""
    block, layers = _ARCHS[config.arch]
    stages = config.attention_stages
    return ResNet(
        block,
        layers,
        num_classes=config.num_classes,
        attn_layer=partial(
            CBAM, reduction=config.cbam_reduction, kernel_size=config.cbam_kernel_size
        ),
        stage_attn=stages if config.cbam == "stage" else frozenset(),
        block_attn=stages if config.cbam in ("block", "block_post") else frozenset(),
        attn_position="post" if config.cbam == "block_post" else "branch",
        ibn_stages=IBN_STAGES if config.ibn else frozenset(),
        head=config.head,
    )
