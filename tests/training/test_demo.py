"""The demo model that the service publishes into an empty model repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.training.train_helpers import one_thread
from training.demo import bootstrap_demo
from wastenet.artifacts import list_versions, load_version


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_thread()


@pytest.mark.slow
def test_bootstrap_demo_publishes_a_loadable_demo_version(tmp_path: Path) -> None:
    lines: list[str] = []
    ref = bootstrap_demo(tmp_path / "models", log=lines.append, budget_s=15, images_per_class=12)
    assert (ref.name, ref.version) == ("waste-resnet18-cbam", 1)
    assert list_versions(tmp_path / "models" / "waste-resnet18-cbam") == [1]
    loaded = load_version(ref.path)
    meta = loaded.metadata
    assert "DEMO" in meta.description and "SYNTHETIC" in meta.description
    assert meta.model_extra is not None and meta.model_extra["demo"] is True
    assert meta.architecture.arch == "resnet18" and meta.architecture.cbam == "block"
    assert meta.preprocessing.input_size == 48
    size = meta.preprocessing.input_size
    probs = loaded.model(torch.randn(2, 3, size, size)).softmax(1)
    assert probs.shape == (2, 12)
    assert any("published" in line for line in lines)
    assert not list(tmp_path.glob("models/waste-resnet18-cbam/.tmp-*"))

    # Both ONNX files, or the fp32 one and the reason the int8 file was left out.
    fp32 = meta.export("fp32")
    assert fp32 is not None and fp32.agreement is not None
    assert fp32.agreement.top1_agreement == 1.0 and (ref.path / "model.onnx").is_file()
    int8 = meta.export("int8")
    if int8 is None:
        assert any(line.startswith("demo: left out model.int8.onnx: top-1") for line in lines)
        assert not (ref.path / "model.int8.onnx").exists()
    else:
        assert int8.agreement is not None and not int8.agreement.forced
        assert int8.agreement.top1_agreement >= int8.agreement.threshold == 0.99
        assert int8.quantization is not None and int8.quantization.model_extra is not None
        assert int8.quantization.model_extra["recipe"] == "conv-keep-stem"
        assert (ref.path / "model.int8.onnx").is_file()
