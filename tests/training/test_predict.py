"""Batch prediction's inputs: which files it reads, and the output it refuses up front."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from training.cli import main
from training.data import IMAGE_EXTENSIONS
from training.predict import find_images


def test_predict_reads_every_extension_that_training_reads(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    for name in ("a.jfif", "b.jpe", "c.JPG", "d.png", "sub/e.webp"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        fmt = {".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower(), "JPEG")
        image.save(path, format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.jfif", "b.jpe", "c.JPG", "d.png", "sub/e.webp"]
    assert {".jfif", ".jpe"} <= IMAGE_EXTENSIONS


def test_a_bad_output_suffix_stops_before_any_model_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The model source does not exist: the suffix must be refused first.
    code = main(["predict", str(tmp_path / "no-model"), str(tmp_path), "--out",
                 str(tmp_path / "preds.txt"), "--device", "cpu"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "preds.txt must end in .csv or .json" in err
    assert not (tmp_path / "preds.txt").exists()
