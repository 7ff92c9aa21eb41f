"""``predict --cam DIR`` and the report's attention figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from training.cli import main
from training.data import Sample
from training.predict import load_predictor
from training.reports import plot_attention_maps
from wastenet.artifacts import publish_version
from wastenet.classes import CLASS_NAMES
from wastenet.explain import explain, input_image, overlay
from wastenet.nets import CBAM, ModelConfig, build_model
from wastenet.preprocess import eval_transform
from wastenet.schema import Preprocessing

PRE = Preprocessing(resize_size=36, input_size=32)
EVALUATION = {"num_samples": 1, "accuracy": 1.0, "macro_f1": 1.0, "per_class_f1": {}}


def _network(cbam: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(cbam=cbam))
    with torch.no_grad():  # gates that vary over the image, as after training
        for m in model.modules():
            if isinstance(m, CBAM):
                for p in m.parameters():
                    p.normal_(0, 0.5)
    return model.eval()


def _version(tmp_path: Path, cbam: str) -> Path:
    config = ModelConfig(cbam=cbam)
    ref = publish_version(
        tmp_path / "models", f"m-{cbam}", _network(cbam), config, CLASS_NAMES, EVALUATION, PRE
    )
    return ref.path


def _images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = [folder / "a.png", folder / "sub" / "b.jpg"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return paths


def test_predict_cam_writes_overlays_beside_the_predictions(tmp_path: Path) -> None:
    version = _version(tmp_path, "block")
    images = tmp_path / "photos"
    paths = _images(images)
    cams = tmp_path / "cams"
    argv = ["predict", str(version), str(images), "--out", str(tmp_path / "p.csv")]
    assert main([*argv, "--cam", str(cams), "--device", "cpu"]) == 0
    written = sorted(p.relative_to(cams).as_posix() for p in cams.rglob("*.png"))
    assert written == [
        "a.png.attention.png",
        "a.png.gradcam.png",
        "sub/b.jpg.attention.png",
        "sub/b.jpg.gradcam.png",
    ]
    # The Grad-CAM overlay is the predicted class's map over the input, at 224 px.
    predictor = load_predictor(version)
    with Image.open(paths[1]) as img:
        tensor = eval_transform(PRE)(img)
    (result,) = explain(predictor.model, tensor[None])
    base = input_image(tensor, PRE).resize((224, 224), Image.Resampling.BILINEAR)
    expected = np.asarray(overlay(base, result.cam, rescale=False))
    got = np.asarray(Image.open(cams / "sub" / "b.jpg.gradcam.png"))
    assert got.shape == (224, 224, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_predict_cam_without_cbam_writes_grad_cam_only(tmp_path: Path) -> None:
    version = _version(tmp_path, "none")
    images = tmp_path / "photos"
    _images(images)
    cams = tmp_path / "cams"
    argv = ["predict", str(version), str(images), "--out", str(tmp_path / "p.json")]
    assert main([*argv, "--cam", str(cams), "--device", "cpu"]) == 0
    assert sorted(p.name for p in cams.rglob("*.png")) == ["a.png.gradcam.png", "b.jpg.gradcam.png"]


@pytest.mark.parametrize("cbam", ["block", "none"])
def test_attention_figure_has_a_row_per_image(tmp_path: Path, cbam: str) -> None:
    paths = _images(tmp_path / "photos")
    samples = [Sample(str(p), i) for i, p in enumerate(paths)]
    out = plot_attention_maps(_network(cbam), samples, CLASS_NAMES, PRE, tmp_path / "a.png")
    with Image.open(out) as img:
        width, height = img.size
    assert width == 720 and height == 2 * 230
