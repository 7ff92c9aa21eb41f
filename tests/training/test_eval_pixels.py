"""Training's image -> tensor paths on asymmetric images, against an independent reference.

Validation, test evaluation and ``predict`` read files through ``ImageDataset`` with the
shared evaluation transform; training reads them through ``TrainTransform``. With the
randomness switched off, each must give the reference pixels of tests/reference_images.py
(Pillow and numpy only), so a wrong resize, crop, orientation, channel order or
normalisation on the training side fails here rather than in a model's accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reference_images import (
    ORIENT,
    QuadrantProbe,
    centred_log_probs,
    composite_on_white,
    encode,
    noise,
    probe_logits,
    quadrants,
    reference_normalize,
    reference_resize_crop,
)
from training.augment import AugmentConfig, train_transform
from training.data import ImageDataset, Sample
from training.predict import Predictor, predict_images
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig
from wastenet.preprocess import eval_transform
from wastenet.schema import Preprocessing

P = Preprocessing(resize_size=36, input_size=32, mean=(0.1, 0.5, 0.9), std=(0.2, 0.4, 0.8))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("orientation", [1, 6])
def test_evaluation_dataset_reads_files_as_the_reference_does(
    tmp_path: Path, orientation: int
) -> None:
    rgba = np.concatenate([noise(70, 40, seed=7), np.full((40, 70, 1), 255, np.uint8)], -1)
    rgba[:10, :, 3] = 0  # a transparent band along the top edge of the stored image
    path = write(tmp_path / "a.png", encode(rgba, "PNG", orientation))
    dataset = ImageDataset([Sample(str(path), 3)], eval_transform(P))
    tensor, label = dataset[0]
    upright = ORIENT[orientation](composite_on_white(rgba))
    expected = reference_normalize(reference_resize_crop(upright, 36, 32), P.mean, P.std)
    assert label == 3
    assert np.allclose(tensor.double().numpy(), expected, atol=1e-5)


def test_train_transform_without_randomness_is_a_plain_resize_in_rgb_order() -> None:
    """Full-image crop, no flips, jitter or rotation: only resize, channel order, scaling."""
    still = AugmentConfig(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        hflip=0.0,
        color_jitter=0.0,
        hue=0.0,
        rotation=0.0,
    )
    pixels = noise(48, 48, seed=8)
    out = train_transform(P, still)(Image.fromarray(pixels, "RGB"))
    resized = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR))
    expected = reference_normalize(resized, P.mean, P.std)
    assert np.allclose(out.double().numpy(), expected, atol=1e-5)


def red_corner(width: int, height: int) -> np.ndarray:
    """Black with a red block in the top-left quadrant: one logit of the probe stands out."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[2 : height // 2 - 2, 2 : width // 2 - 2] = (255, 0, 0)
    return pixels


def test_predict_images_sees_each_quadrant_where_it_is(tmp_path: Path) -> None:
    """A probe network reports the colour it saw per quadrant; EXIF turns the picture."""
    predictor = Predictor(
        QuadrantProbe(), ModelConfig(), list(CLASS_NAMES), P, "probe", torch.device("cpu")
    )
    images = {
        "quadrants.png": (quadrants(96, 64), 1),
        "quadrants-turned.png": (quadrants(96, 64), 8),
        "red.png": (red_corner(96, 64), 1),
        "red-turned.png": (red_corner(96, 64), 8),
    }
    paths = [write(tmp_path / name, encode(a, "PNG", o)) for name, (a, o) in images.items()]
    rows = predict_images(predictor, paths, top_k=12)
    for row, (stored, orientation) in zip(rows, images.values(), strict=True):
        upright = ORIENT[orientation](stored)
        reference = reference_normalize(reference_resize_crop(upright, 36, 32), P.mean, P.std)
        served = {CLASS_NAMES.index(t["class"]): t["probability"] for t in row["predictions"]}
        probabilities = np.array([served[i] for i in range(12)])
        expected = probe_logits(reference)
        assert np.allclose(centred_log_probs(probabilities), expected - expected.mean(), atol=1e-4)
    # Logit 3 * quadrant + channel: red top left is 0; turned anticlockwise, bottom left is 6.
    top = {Path(row["path"]).name: row["predictions"][0]["class"] for row in rows}
    assert top["red.png"] == CLASS_NAMES[0] and top["red-turned.png"] == CLASS_NAMES[6]
