"""The tensor the service feeds the network, against an independent reference.

The other service tests compare the service with training's own evaluation transform, so a
mistake in the shared preprocessing passes them on both sides. Here the expected pixels
come from tests/reference_images.py (Pillow and numpy only): an uploaded asymmetric image
must reach the network upright, alpha on white, short side resized, centre-cropped, in RGB
order, normalised with the version's mean and std, in channels_last layout.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import app.registry
from app.backends import TorchBackend
from app.images import decode_image
from app.inference import InferenceModel
from tests.app.conftest import MODEL, PREPROCESSING, files
from tests.reference_images import (
    ORIENT,
    QuadrantProbe,
    centred_log_probs,
    composite_on_white,
    encode,
    noise,
    probe_logits,
    quadrants,
    ramp,
    reference_normalize,
    reference_resize_crop,
)
from wastenet.artifacts import LoadedVersion, load_version
from wastenet.classes import CLASS_NAMES

P = PREPROCESSING
LIMIT = 10_000_000


def reference_crop(stored: np.ndarray, orientation: int = 1) -> np.ndarray:
    """uint8 (32, 32, 3): what the network must see of a stored RGB or RGBA array."""
    rgb = composite_on_white(stored) if stored.shape[-1] == 4 else stored
    return reference_resize_crop(ORIENT[orientation](rgb), P.resize_size, P.input_size)


def decoded(data: bytes) -> np.ndarray:
    # Full-scale decoding: the reduced-scale JPEG decode has its own tolerance tests.
    array = decode_image(data, "upload", P, LIMIT, jpeg_draft=False).array
    assert array.dtype == np.uint8 and array.shape == (32, 32, 3)
    return array


def with_transparent_columns(rgb: np.ndarray) -> np.ndarray:
    alpha = np.where(np.arange(rgb.shape[1]) % 5 == 0, 0, 255).astype(np.uint8)
    alpha_plane = np.broadcast_to(alpha[None, :, None], (*rgb.shape[:2], 1))
    return np.concatenate([rgb, alpha_plane], axis=-1)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_an_uploaded_png_becomes_the_reference_pixels_exactly(orientation: int) -> None:
    stored = with_transparent_columns(noise(90, 50, seed=orientation))
    data = encode(stored, "PNG", orientation)
    assert np.array_equal(decoded(data), reference_crop(stored, orientation))
    header = decode_image(data, "upload", P, LIMIT)
    assert (header.width, header.height) == (90, 50)  # as stored, before turning upright


@pytest.mark.parametrize("orientation", [1, 6])
def test_an_uploaded_jpeg_becomes_the_reference_pixels_within_jpeg_error(
    orientation: int,
) -> None:
    stored = ramp(144, 72)
    data = encode(stored, "JPEG", orientation, quality=95)
    got = decoded(data).astype(int)
    error = np.abs(got - reference_crop(stored, orientation).astype(int))
    assert error.max() <= 4 and error.mean() <= 1.0
    as_decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # stored, not turned
    assert np.array_equal(got, reference_crop(as_decoded, orientation))


@pytest.mark.parametrize(
    ("fmt", "save", "tolerance"),
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("GIF", {}, 0),  # four colours: the palette holds them exactly
        ("JPEG", {"quality": 95}, 4),
        ("WEBP", {"quality": 95}, 5),
    ],
    ids=["png", "bmp", "tiff", "webp-lossless", "gif", "jpeg", "webp-lossy"],
)
def test_every_allowed_format_gives_the_reference_crop(
    fmt: str, save: dict[str, object], tolerance: int
) -> None:
    stored = quadrants(96, 64) if fmt == "GIF" else ramp(144, 72)
    data = encode(stored, fmt, **save)
    got = decoded(data).astype(int)
    as_decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(got, reference_crop(as_decoded))
    assert np.abs(got - reference_crop(stored).astype(int)).max() <= tolerance


def test_network_input_is_normalised_rgb_in_channels_last(template_repo: Path) -> None:
    loaded = load_version(template_repo / MODEL / "1")
    assert loaded.metadata.preprocessing == P
    backend = TorchBackend(loaded.model, torch.device("cpu"), "fp32", P, 12, max_batch_size=3)
    model = InferenceModel(loaded, backend, max_batch_size=3)
    uploads = [(noise(90, 50, seed=11), 1), (quadrants(64, 96), 6), (ramp(144, 72), 8)]
    arrays = [decode_image(encode(a, "PNG", o), "u", P, LIMIT).array for a, o in uploads]
    x = backend.normalise(model.stack(arrays))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x.stride()[1] == 1  # channels innermost: NHWC in memory
    crops = np.stack([reference_crop(a, o) for a, o in uploads])
    expected = reference_normalize(crops, P.mean, P.std)
    assert np.allclose(x.double().numpy(), expected, atol=1e-5)


# -- end to end: a probe network behind the HTTP API ------------------------------------


@pytest.fixture
def probe_client(
    monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., TestClient]
) -> TestClient:
    """The service with every loaded version's network replaced by a QuadrantProbe."""
    original = app.registry.load_version

    def load_probe(path: Path, map_location: str) -> LoadedVersion:
        loaded = original(path, map_location)
        return replace(loaded, model=QuadrantProbe())

    monkeypatch.setattr(app.registry, "load_version", load_probe)
    return make_client(backend="torch")


def red_corner(width: int, height: int) -> np.ndarray:
    """Black with a red block in the top-left quadrant: one logit of the probe stands out."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[2 : height // 2 - 2, 2 : width // 2 - 2] = (255, 0, 0)
    return pixels


def test_predictions_follow_the_pixels_and_their_orientation(probe_client: TestClient) -> None:
    uploads = {
        "quadrants.png": encode(quadrants(96, 64), "PNG"),
        "quadrants-turned.jpg": encode(quadrants(96, 64), "JPEG", 6, quality=95),
        "red.png": encode(red_corner(96, 64), "PNG"),
        "red-turned.png": encode(red_corner(96, 64), "PNG", 8),
        "alpha.png": encode(with_transparent_columns(noise(70, 40, seed=3)), "PNG", 6),
    }
    response = probe_client.post("/v1/predict", files=files(*uploads.items()), params={"top_k": 12})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == list(uploads)
    for prediction, data in zip(predictions, uploads.values(), strict=True):
        img = Image.open(io.BytesIO(data))
        orientation = img.getexif().get(0x0112, 1)
        stored = np.asarray(img.convert("RGBA" if img.mode == "RGBA" else "RGB"))
        expected = probe_logits(
            reference_normalize(reference_crop(stored, orientation), P.mean, P.std)
        )
        by_index = {t["class_index"]: t["confidence"] for t in prediction["top_k"]}
        served = centred_log_probs(np.array([by_index[i] for i in range(12)]))
        assert np.allclose(served, expected - expected.mean(), atol=1e-4), prediction["filename"]
    # Logit 3 * quadrant + channel: red top left is 0; turned anticlockwise, bottom left is 6.
    labels = {p["filename"]: p["label"] for p in predictions}
    assert labels["red.png"] == CLASS_NAMES[0]
    assert labels["red-turned.png"] == CLASS_NAMES[6]
