"""The synthetic dataset generator: layout, determinism, refusal to clobber, learnability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.synth import MANIFEST_FILE, generate_synthetic_dataset, render_image
from wastenet.classes import CLASS_NAMES


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_writes_every_class_in_the_documented_layout(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    written = generate_synthetic_dataset(out, images_per_class=3, size=40, seed=1)

    assert written == dict.fromkeys(CLASS_NAMES, 3)
    for name in CLASS_NAMES:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == [f"{name}_0000.jpg", f"{name}_0001.jpg", f"{name}_0002.jpg"]
        with Image.open(out / name / files[0]) as img:
            assert img.format == "JPEG"
            assert img.mode == "RGB"
            assert img.size == (40, 40)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["synthetic"] is True
    assert manifest["seed"] == 1
    assert manifest["classes"] == written


def test_same_seed_same_images_other_seed_other_images(tmp_path: Path) -> None:
    for folder, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate_synthetic_dataset(
            tmp_path / folder,
            2,
            size=32,
            seed=seed,
            image_format="png",
            class_names=("battery", "paper"),
        )
    for rel in ("battery/battery_0000.png", "paper/paper_0001.png"):
        a, b, c = (_pixels(tmp_path / d / rel) for d in "abc")
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_an_image_does_not_depend_on_how_many_are_generated(tmp_path: Path) -> None:
    generate_synthetic_dataset(
        tmp_path / "few", 2, size=32, image_format="png", class_names=["metal"]
    )
    generate_synthetic_dataset(
        tmp_path / "more", 5, size=32, image_format="png", class_names=["metal"]
    )
    assert np.array_equal(
        _pixels(tmp_path / "few/metal/metal_0001.png"),
        _pixels(tmp_path / "more/metal/metal_0001.png"),
    )
    # The PNG holds exactly what render_image draws.
    assert np.array_equal(
        _pixels(tmp_path / "few/metal/metal_0001.png"), np.asarray(render_image("metal", 1, 32))
    )


def test_dashed_spelling_names_the_folder_and_draws_the_same_class(tmp_path: Path) -> None:
    generate_synthetic_dataset(
        tmp_path, 1, size=32, image_format="png", class_names=["brown-glass"]
    )
    img = _pixels(tmp_path / "brown-glass" / "brown-glass_0000.png")
    assert np.array_equal(img, np.asarray(render_image("brown_glass", 0, 32)))


def test_images_vary_within_a_class() -> None:
    imgs = [np.asarray(render_image("cardboard", i, 32), dtype=np.float32) for i in range(6)]
    diffs = [np.abs(imgs[0] - other).mean() for other in imgs[1:]]
    assert min(diffs) > 10.0  # mean absolute difference on a 0..255 scale


def test_refuses_a_folder_that_already_holds_images(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "mine" / "holiday.jpg")
    with pytest.raises(FileExistsError, match=r"already holds 1 images"):
        generate_synthetic_dataset(tmp_path, 1, size=32, class_names=["paper"])
    assert not (tmp_path / "paper").exists()


def test_overwrite_replaces_earlier_output_and_keeps_other_files(tmp_path: Path) -> None:
    generate_synthetic_dataset(tmp_path, 3, size=32, class_names=["shoes"])
    (tmp_path / "shoes" / "notes.txt").write_text("keep me")
    generate_synthetic_dataset(tmp_path, 2, size=32, class_names=["shoes"], overwrite=True)
    assert sorted(p.name for p in (tmp_path / "shoes").iterdir()) == [
        "notes.txt",
        "shoes_0000.jpg",
        "shoes_0001.jpg",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_names": ["glass"]}, r"unknown class 'glass'; valid names: battery, "),
        ({"class_names": ["brown_glass", "brown-glass"]}, r"name a class twice"),
        ({"images_per_class": 0}, r"images_per_class must be at least 1, got 0"),
        ({"size": 8}, r"size must be at least 16 pixels, got 8"),
        ({"image_format": "gif"}, r"image_format must be 'jpg' or 'png', got 'gif'"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(tmp_path, **kwargs)


def _object_colour_histogram(img: Image.Image) -> np.ndarray:
    """Colours of the centre minus colours of the border: a crude "object colour" feature."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    q = (a * 3.999).astype(int)
    idx = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    n = a.shape[0]
    centre = np.zeros((n, n), dtype=bool)
    centre[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = True
    hc = np.bincount(idx[centre], minlength=64) / centre.sum()
    hb = np.bincount(idx[~centre], minlength=64) / (~centre).sum()
    return np.clip(hc - hb, 0.0, None)


def test_classes_are_learnable_but_not_trivial() -> None:
    """A nearest-centroid classifier on object colour beats chance (1/12) clearly but is far
    from perfect: colour is a real cue, and shape and texture are needed for the rest."""
    train_x = np.array(
        [
            _object_colour_histogram(render_image(c, i, 48, seed=0))
            for c in CLASS_NAMES
            for i in range(20)
        ]
    )
    train_y = np.repeat(np.arange(12), 20)
    test_x = np.array(
        [
            _object_colour_histogram(render_image(c, i, 48, seed=1))
            for c in CLASS_NAMES
            for i in range(12)
        ]
    )
    test_y = np.repeat(np.arange(12), 12)
    centroids = np.stack([train_x[train_y == k].mean(axis=0) for k in range(12)])
    dist = ((test_x[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = float((dist.argmin(axis=1) == test_y).mean())
    assert 0.2 < accuracy < 0.8, accuracy
