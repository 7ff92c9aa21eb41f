"""ResNet with injectable attention, after torchvision's ``resnet.py``.

Layer names follow torchvision (conv1, bn1, layer1..layer4, fc), so torchvision state
dicts map by name. Attention is an injected layer: blocks take ``attn_layer`` (a factory
``channels -> nn.Module``) and put it on the residual branch or after the addition.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from wastenet.nets.cbam import CBAM
from wastenet.nets.common import (
    AttnLayer,
    Classifier,
    NormLayer,
    attention_layer,
    fold_into_input,
    fold_into_successor,
    make_head,
    reset_own_modules,
)
from wastenet.nets.ibn import IBN
from wastenet.schema import ModelConfig

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

    @property
    def last_norm(self) -> nn.Module:
        """The normalisation that feeds the branch attention."""
        return self.bn2

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

    @property
    def last_norm(self) -> nn.Module:
        """The normalisation that feeds the branch attention."""
        return self.bn3

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


def _fold_before(reader: nn.Module | None) -> bool:
    """Fold a CBAM's start factor into the block that reads its output; False when the
    block's identity path would carry the factor on (no downsample to absorb it)."""
    if reader is None:
        return True
    assert isinstance(reader, BasicBlock | Bottleneck)
    if reader.downsample is None:
        return False
    fold_into_successor([reader.bn1, reader.downsample.get_submodule("1")])
    return True


class ResNet(Classifier):
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
        self.fc = make_head(self.num_features, num_classes, head)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) and m.affine:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        reset_own_modules(self)  # the loop above also reached into CBAM and BNNeck

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

    def module_parts(self) -> dict[str, str]:
        parts = {"conv1": "stem", "bn1": "stem", "fc": "head"}
        return parts | {f"layer{k}": f"layer{k}" for k in (1, 2, 3, 4)}

    def fold_attention_start(self) -> list[str]:
        unfolded: list[str] = []
        stages: list[nn.Sequential] = [self.layer1, self.layer2, self.layer3, self.layer4]
        for k, layer in enumerate(stages):
            # What reads each block's (or stage's) output: the next block, or the first
            # block of the next stage, or (after layer4) the fresh head, which has no
            # pretrained function to keep.
            readers = [*list(layer)[1:], stages[k + 1][0] if k < 3 else None]
            for i, (block, reader) in enumerate(zip(layer, readers, strict=True)):
                assert isinstance(block, BasicBlock | Bottleneck)
                if isinstance(block.attn, CBAM):
                    fold_into_input(block.last_norm)
                if isinstance(block.post_attn, CBAM) and not _fold_before(reader):
                    unfolded.append(f"layer{k + 1}.{i}.post_attn")
            stage_attn = getattr(self, f"attn{k + 1}")
            if isinstance(stage_attn, CBAM) and not _fold_before(readers[-1]):
                unfolded.append(f"attn{k + 1}")
        return unfolded

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


RESNET_LAYERS: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
IBN_STAGES = frozenset({1, 2, 3})


def resnet(config: ModelConfig) -> ResNet:
    """A randomly initialised ResNet for ``config`` (see ``load_pretrained``)."""
    block, layers = RESNET_LAYERS[config.arch]
    stages = config.attention_stages
    return ResNet(
        block,
        layers,
        num_classes=config.num_classes,
        attn_layer=attention_layer(config),
        stage_attn=stages if config.cbam == "stage" else frozenset(),
        block_attn=stages if config.cbam in ("block", "block_post") else frozenset(),
        attn_position="post" if config.cbam == "block_post" else "branch",
        ibn_stages=IBN_STAGES if config.ibn else frozenset(),
        head=config.head,
    )
