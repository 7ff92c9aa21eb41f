"""Training-time augmentation: its config and the train transform.

Evaluation never augments: it uses ``wastenet.preprocess.eval_transform``, exactly what
the service does. The train transform ends with the same normalisation, so both sides
feed the network tensors of one distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torchvision.transforms import InterpolationMode

from wastenet.preprocess import normalize, to_rgb
from wastenet.schema import Preprocessing


class AugmentConfig(BaseModel):
    """Training-time augmentation. Evaluation never augments (see preprocess.eval_transform)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    crop_scale: tuple[float, float] = Field(
        default=(0.5, 1.0),
        description="Random resized crop: range of the crop's area as a fraction of the image.",
    )
    crop_ratio: tuple[float, float] = Field(
        default=(3 / 4, 4 / 3),
        description="Random resized crop: range of the crop's aspect ratio (width / height).",
    )
    hflip: float = Field(default=0.5, ge=0.0, le=1.0, description="Horizontal flip probability.")
    vflip: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Vertical flip probability (off by default: photos have an up).",
    )
    color_jitter: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="Brightness, contrast and saturation vary by up to this factor (0 = off).",
    )
    hue: float = Field(
        default=0.02,
        ge=0.0,
        le=0.5,
        description="Hue shift of up to this fraction of the colour circle (0 = off).",
    )
    rotation: float = Field(
        default=10.0,
        ge=0.0,
        le=180.0,
        description="Random rotation of up to this many degrees either way (0 = off); "
        "corners are filled with the normalisation mean.",
    )

    policy: Literal["none", "randaugment", "trivialaugment"] = Field(
        default="none",
        description="Automatic augmentation policy, after the steps above (torchvision's "
        "RandAugment or TrivialAugmentWide); none = off.",
    )
    randaugment_ops: int = Field(
        default=2, ge=1, le=10, description="RandAugment: operations applied to each image."
    )
    randaugment_magnitude: int = Field(
        default=9, ge=0, le=30, description="RandAugment: strength of each operation (0-30)."
    )
    erasing: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Random erasing probability: a box of 2 to 33 percent of the image is set to "
        "the normalisation mean (0 = off).",
    )
    mixup_alpha: float = Field(
        default=0.0,
        ge=0.0,
        description="MixUp: blend pairs of images and their labels with a Beta(alpha, alpha) "
        "weight (0 = off; 0.2 is common).",
    )
    cutmix_alpha: float = Field(
        default=0.0,
        ge=0.0,
        description="CutMix: paste a box from another image, labels mixed by area (0 = off; "
        "1.0 is common). With MixUp too, each batch uses one of the two at random.",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> AugmentConfig:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        rlo, rhi = self.crop_ratio
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        return self


class RandomHueRotation:
    """Rotate hue by up to ``max_shift`` of the colour circle, as one 3x3 colour matrix.

    A rotation around the grey axis in YIQ space: for the small shifts used in training it
    matches an HSV hue shift closely, and Pillow applies it in one pass (about 1 ms for a
    224 px image, against about 5 ms for the HSV round trip of ``ColorJitter(hue=...)``).
    Grey stays grey. The angle comes from torch's generator, so worker seeding applies.
    """

    def __init__(self, max_shift: float) -> None:
        self.max_shift = max_shift

    @staticmethod
    def matrix(turns: float) -> tuple[float, ...]:
        c, s = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
        return (
            0.299 + 0.701 * c + 0.168 * s, 0.587 - 0.587 * c + 0.330 * s,
            0.114 - 0.114 * c - 0.497 * s, 0.0,
            0.299 - 0.299 * c - 0.328 * s, 0.587 + 0.413 * c + 0.035 * s,
            0.114 - 0.114 * c + 0.292 * s, 0.0,
            0.299 - 0.300 * c + 1.250 * s, 0.587 - 0.588 * c - 1.050 * s,
            0.114 + 0.886 * c - 0.203 * s, 0.0,
        )  # fmt: skip

    def __call__(self, img: Image.Image) -> Image.Image:
        turns = float(torch.empty(()).uniform_(-self.max_shift, self.max_shift))
        return img.convert("RGB", self.matrix(turns))


class TrainTransform:
    """PIL image -> augmented, normalised float tensor (3, input_size, input_size).

    A class rather than a closure so DataLoader workers can pickle it under ``spawn``.
    Cropping comes first so the other steps work on the small crop.
    """

    def __init__(self, p: Preprocessing, aug: AugmentConfig) -> None:
        self.preprocessing = p
        self.augment = aug
        try:
            interpolation = InterpolationMode(p.interpolation)
        except ValueError:
            interpolation = InterpolationMode.BILINEAR
        steps: list[Callable[[Any], Any]] = [
            T.RandomResizedCrop(
                p.input_size,
                scale=aug.crop_scale,
                ratio=aug.crop_ratio,
                interpolation=interpolation,
                antialias=True,
            )
        ]
        if aug.hflip > 0:
            steps.append(T.RandomHorizontalFlip(aug.hflip))
        if aug.vflip > 0:
            steps.append(T.RandomVerticalFlip(aug.vflip))
        if aug.color_jitter > 0:
            j = aug.color_jitter
            steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
        if aug.hue > 0:
            steps.append(RandomHueRotation(aug.hue))
        fill = [round(255 * m) for m in p.mean]
        if aug.rotation > 0:
            steps.append(
                T.RandomRotation(aug.rotation, interpolation=InterpolationMode.BILINEAR, fill=fill)
            )
        if aug.policy == "randaugment":
            steps.append(
                T.RandAugment(aug.randaugment_ops, aug.randaugment_magnitude, fill=list(fill))
            )
        elif aug.policy == "trivialaugment":
            steps.append(T.TrivialAugmentWide(fill=list(fill)))
        steps.append(T.PILToTensor())
        self._pipeline = T.Compose(steps)
        # After normalising, so that the erased box is 0: the mean colour, not black.
        self._erase = T.RandomErasing(aug.erasing, value=0.0) if aug.erasing > 0 else None

    def __call__(self, img: Image.Image) -> Tensor:
        uint8: Tensor = self._pipeline(to_rgb(img))
        out = normalize(uint8, self.preprocessing)
        if self._erase is not None:
            out = self._erase(out)
        return out

    def __repr__(self) -> str:
        return f"TrainTransform({self.preprocessing!r}, {self.augment!r})"


def train_transform(p: Preprocessing, aug: AugmentConfig) -> Callable[[Image.Image], Tensor]:
    """Random resized crop to ``p.input_size``, flips, colour jitter, small rotation, the
    optional policy, normalise, optional random erasing."""
    return TrainTransform(p, aug)


class BatchMix:
    """MixUp and/or CutMix on a batch: (images, int labels) -> (mixed images, soft labels).

    torchvision's transforms; with both enabled each batch uses one, chosen at random.
    Applied to whole batches on the device, after the loader.
    """

    def __init__(self, aug: AugmentConfig, num_classes: int) -> None:
        mixes: list[Callable[..., Any]] = []
        if aug.mixup_alpha > 0:
            mixes.append(T.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
        if aug.cutmix_alpha > 0:
            mixes.append(T.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
        if not mixes:
            raise ValueError("BatchMix needs mixup_alpha or cutmix_alpha > 0")
        self._mix = mixes[0] if len(mixes) == 1 else T.RandomChoice(mixes)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        mixed, soft = self._mix(images, labels)
        return mixed, soft


def batch_transform(aug: AugmentConfig, num_classes: int) -> BatchMix | None:
    """The batch-level mix for the training loop, or None when MixUp and CutMix are off."""
    if aug.mixup_alpha == 0 and aug.cutmix_alpha == 0:
        return None
    return BatchMix(aug, num_classes)
