"""Augmentation: config validation, the train transform, hue rotation and rotation fill."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from pydantic import ValidationError

from training.augment import (
    AugmentConfig,
    BatchMix,
    RandomHueRotation,
    batch_transform,
    train_transform,
)
from wastenet.preprocess import eval_transform
from wastenet.schema import Preprocessing


def test_augment_config_validation() -> None:
    assert AugmentConfig().crop_scale == (0.5, 1.0)
    with pytest.raises(ValidationError, match=r"crop_scale must satisfy 0 < min <= max <= 1"):
        AugmentConfig(crop_scale=(0.9, 0.5))
    with pytest.raises(ValidationError, match=r"hflip"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValidationError, match=r"extra"):
        AugmentConfig(flip=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=r"frozen"):
        AugmentConfig().rotation = 5.0  # type: ignore[misc]


P = Preprocessing(resize_size=32, input_size=32)
NO_AUG = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0, hue=0.0, rotation=0.0
)


def _photo(size: int = 48, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


def test_train_transform_without_augmentation_equals_eval_transform() -> None:
    img = _photo()
    expected = eval_transform(P)(img)
    out = train_transform(P, NO_AUG)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, expected)
    flipped = train_transform(P, NO_AUG.model_copy(update={"hflip": 1.0}))(img)
    assert torch.equal(flipped, expected.flip(-1))


def test_train_transform_is_random_reproducible_and_picklable() -> None:
    img = _photo()
    transform = train_transform(P, AugmentConfig())
    torch.manual_seed(0)
    a = transform(img)
    b = transform(img)
    torch.manual_seed(0)
    a2 = transform(img)
    assert a.shape == (3, 32, 32)
    assert not torch.equal(a, b)
    assert torch.equal(a, a2)
    clone = pickle.loads(pickle.dumps(transform))
    torch.manual_seed(0)
    assert torch.equal(clone(img), a)
    # Palette and alpha images go through to_rgb first.
    assert transform(_photo(mode="P")).shape == (3, 32, 32)
    assert transform(_photo(mode="RGBA")).shape == (3, 32, 32)


def test_hue_rotation_keeps_grey_and_brightness_and_turns_colours() -> None:
    img = Image.fromarray(
        np.array([[[128, 128, 128], [160, 80, 80], [40, 160, 60]]], dtype=np.uint8)
    )
    same = np.asarray(img.convert("RGB", RandomHueRotation.matrix(0.0)), dtype=int)
    assert np.abs(same - np.asarray(img, dtype=int)).max() <= 1
    third = np.asarray(img.convert("RGB", RandomHueRotation.matrix(1 / 3)), dtype=int)
    assert np.abs(third[0, 0] - 128).max() <= 1  # grey stays grey
    # A third of a turn moves a red pixel's dominant channel away from red.
    assert third[0, 1].argmax() != 0
    luma = np.array([0.299, 0.587, 0.114])
    assert abs(third[0, 1] @ luma - np.array([160, 80, 80]) @ luma) < 2
    torch.manual_seed(0)
    a = np.asarray(RandomHueRotation(0.05)(img))
    torch.manual_seed(0)
    assert np.array_equal(a, np.asarray(RandomHueRotation(0.05)(img)))


def test_rotation_fills_corners_with_the_mean() -> None:
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    transform = train_transform(P, NO_AUG.model_copy(update={"rotation": 180.0}))
    torch.manual_seed(1)
    corners = [transform(white)[:, 0, 0] for _ in range(10)]
    # White normalises to about +2; the mean fill normalises to about 0.
    filled = [c for c in corners if c.abs().max() < 0.05]
    assert len(filled) >= 8


def test_policies_come_from_torchvision_and_are_off_by_default() -> None:
    def steps(aug: AugmentConfig) -> list[type]:
        return [type(t) for t in train_transform(P, aug)._pipeline.transforms]  # type: ignore[attr-defined]

    assert T.RandAugment not in steps(AugmentConfig())
    assert T.TrivialAugmentWide not in steps(AugmentConfig())
    rand = train_transform(P, AugmentConfig(policy="randaugment", randaugment_ops=3))
    chosen = [t for t in rand._pipeline.transforms if isinstance(t, T.RandAugment)]  # type: ignore[attr-defined]
    assert len(chosen) == 1 and chosen[0].num_ops == 3 and chosen[0].magnitude == 9
    assert T.TrivialAugmentWide in steps(AugmentConfig(policy="trivialaugment"))
    with pytest.raises(ValidationError, match="policy"):
        AugmentConfig(policy="autoaugment")  # type: ignore[arg-type]


def test_random_erasing_fills_a_box_with_the_mean_colour() -> None:
    img = _photo(32)
    plain = train_transform(P, NO_AUG)(img)
    torch.manual_seed(0)
    erased = train_transform(P, NO_AUG.model_copy(update={"erasing": 1.0}))(img)
    changed = (erased != plain).any(dim=0)
    assert 0.02 * 32 * 32 <= changed.sum() <= 0.34 * 32 * 32
    # The box is 0 after normalisation (the mean colour) and rectangular.
    assert torch.all(erased[:, changed] == 0.0)
    rows, cols = changed.nonzero(as_tuple=True)
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all()
    assert train_transform(P, NO_AUG)._erase is None  # type: ignore[attr-defined]


def test_mixup_and_cutmix_give_convex_mixes_and_soft_labels() -> None:
    assert batch_transform(AugmentConfig(), 12) is None
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    mixed, soft = BatchMix(AugmentConfig(mixup_alpha=0.4), 5)(images, labels)
    # MixUp pairs each image with its neighbour in the batch: lam * x_i + (1 - lam) * x_{i-1}.
    lam = float(soft[0, 0])
    assert torch.allclose(mixed[1], lam * images[1] + (1 - lam) * images[0])
    assert soft.shape == (4, 5) and torch.allclose(soft.sum(1), torch.ones(4))
    assert soft[1, 1] == pytest.approx(lam) and soft[1, 0] == pytest.approx(1 - lam)
    torch.manual_seed(1)
    cut, soft = BatchMix(AugmentConfig(cutmix_alpha=1.0), 5)(images, labels)
    # CutMix pastes a box: every pixel comes from one of the two images; labels by area.
    from_own = (cut[1] == 1.0).float().mean()
    assert torch.all((cut[1] == 1.0) | (cut[1] == 0.0))
    assert soft[1, 1] == pytest.approx(float(from_own), abs=1e-6)
