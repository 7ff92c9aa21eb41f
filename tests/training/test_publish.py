"""Publishing a run with exported ONNX files, deriving versions with ``export``, and the
refusals: int8 below the agreement threshold, and weights that are already published."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from tests.training.train_helpers import make_data, one_thread, tiny_config
from training import export as export_module
from training.cli import main
from training.config import ConfigError
from training.data import DataSplits
from training.export import DEFAULT_RECIPE, ExportConfig
from training.publish import export_version, publish_run
from training.trainer import train
from wastenet.artifacts import (
    DuplicateVersionError,
    list_versions,
    load_version,
    read_export,
    read_metadata,
    sha256_file,
)
from wastenet.preprocess import eval_transform
from wastenet.schema import AgreementReport

NAME = "tiny"


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_thread()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished one-epoch run (CBAM in layer4 only: quick to export)."""
    root = tmp_path_factory.mktemp("publish")
    data = make_data(root, images_per_class=6, size=40)
    config = tiny_config(
        data,
        root / "run",
        strategy="differential",
        epochs=1,
        model={"cbam": "block", "cbam_stages": [4]},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(config, log=lambda _m: None)
    torch.set_num_threads(threads)
    return {"run": root / "run", "data": data}


def _quiet(_message: str) -> None:
    pass


@pytest.mark.slow
def test_publish_writes_both_exports_measured_on_the_test_split(
    run: dict[str, Path], tmp_path: Path
) -> None:
    lines: list[str] = []
    options = ExportConfig(int8=True, calibration_images=20, min_agreement=0.0)
    ref = publish_run(run["run"], tmp_path, NAME, export=options, log=lines.append)
    meta = read_metadata(ref.path)
    assert [(e.file, e.precision) for e in meta.exports] == [
        ("model.onnx", "fp32"),
        ("model.int8.onnx", "int8"),
    ]
    test = DataSplits.load(run["run"] / "splits.json").test
    for exported in meta.exports:
        assert sha256_file(ref.path / exported.file) == exported.sha256
        read_export(ref.path, exported)
        report = exported.agreement
        assert report is not None and report.num_samples == len(test) and not report.forced
        assert sum(c.num_samples for c in report.per_class.values()) == len(test)
    fp32, int8 = meta.exports
    assert fp32.agreement is not None and fp32.agreement.top1_agreement == 1.0
    assert fp32.agreement.max_prob_diff < 1e-4 and fp32.quantization is None
    quant = int8.quantization
    assert quant is not None and quant.calibration_images == 20
    assert quant.calibration_source == f"train and val split of run {run['run']}"
    assert quant.model_extra is not None and quant.model_extra["recipe"] == DEFAULT_RECIPE
    assert meta.model_extra is not None
    assert meta.model_extra["export"]["onnxruntime"] == ort.__version__
    assert any("calibrating on 20 images" in line for line in lines)

    # The published fp32 file answers like the published weights on a real test image.
    loaded = load_version(ref.path)
    with Image.open(test[0].path) as img:
        x = eval_transform(meta.preprocessing)(img)[None]
    session = ort.InferenceSession(str(ref.path / "model.onnx"))
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    with torch.no_grad():
        assert np.abs(logits - loaded.model(x).numpy()).max() < 1e-4


def _degrade_int8(monkeypatch: pytest.MonkeyPatch, agreement: float) -> None:
    """int8 measures ``agreement`` (fp32 keeps its real report)."""
    real = export_module.measure_agreement

    def measure(*args: Any, **kwargs: Any) -> dict[str, AgreementReport]:
        reports = real(*args, **kwargs)
        if "int8" in reports:
            reports["int8"] = reports["int8"].model_copy(update={"top1_agreement": agreement})
        return reports

    monkeypatch.setattr(export_module, "measure_agreement", measure)


@pytest.mark.slow
def test_int8_below_the_threshold_is_refused_unless_forced(
    run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _degrade_int8(monkeypatch, 0.875)
    repo = tmp_path / "models"
    folder = tmp_path / "calibration"
    folder.mkdir()
    for path in sorted(run["data"].glob("*/*.jpg"))[:5]:
        shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    options = ExportConfig(int8=True, calibration_dir=folder, calibration_images=3)
    with pytest.raises(export_module.AgreementError) as exc:
        publish_run(run["run"], repo, NAME, export=options, log=_quiet)
    assert "model.int8.onnx: top-1 agreement 0.8750" in str(exc.value)
    assert "below the threshold 0.9900" in str(exc.value)
    assert list_versions(repo / NAME) == [] and not list((repo / NAME).glob(".tmp-*"))

    forced = options.model_copy(update={"force": True})
    ref = publish_run(run["run"], repo, NAME, export=forced, log=_quiet)
    meta = read_metadata(ref.path)
    fp32, int8 = meta.exports
    assert int8.agreement is not None and int8.agreement.forced
    assert int8.agreement.top1_agreement == 0.875
    assert fp32.agreement is not None and not fp32.agreement.forced
    assert int8.quantization is not None and int8.quantization.calibration_images == 3
    assert int8.quantization.calibration_source == str(folder)


@pytest.mark.slow
def test_drop_refused_publishes_the_files_that_pass(
    run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _degrade_int8(monkeypatch, 0.5)
    lines: list[str] = []
    options = ExportConfig(int8=True, calibration_images=8)
    ref = publish_run(
        run["run"], tmp_path, NAME, export=options, drop_refused=True, log=lines.append
    )
    assert [e.file for e in read_metadata(ref.path).exports] == ["model.onnx"]
    assert not (ref.path / "model.int8.onnx").exists()
    assert any(
        line.startswith("left out model.int8.onnx: top-1 agreement 0.5000") for line in lines
    )


def test_publishing_a_run_twice_is_refused_naming_the_version(
    run: dict[str, Path], tmp_path: Path
) -> None:
    first = publish_run(run["run"], tmp_path, NAME, log=_quiet)
    lines: list[str] = []
    with pytest.raises(DuplicateVersionError, match=f"as {NAME} version 1 "):
        publish_run(run["run"], tmp_path, NAME, export=ExportConfig(int8=True), log=lines.append)
    assert lines == []  # refused before any export work
    assert list_versions(tmp_path / NAME) == [1]
    second = publish_run(run["run"], tmp_path, NAME, export=ExportConfig(force=True), log=_quiet)
    assert second.version == 2
    assert read_metadata(second.path).weights_sha256 == read_metadata(first.path).weights_sha256


@pytest.mark.slow
def test_export_derives_a_new_version_from_a_published_one(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "models"
    source = publish_run(run["run"], repo, NAME, log=_quiet).path
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    assert main(["export", str(source), "--int8", "--min-agreement", "0",
                 "--calibration-images", "12"]) == 0  # fmt: skip
    assert "version 2" in capsys.readouterr().out
    derived = repo / NAME / "2"
    meta, original = read_metadata(derived), read_metadata(source)
    assert meta.derived_from is not None
    assert (meta.derived_from.name, meta.derived_from.version) == (NAME, 1)
    assert meta.weights_sha256 == meta.derived_from.weights_sha256 == original.weights_sha256
    assert [e.file for e in meta.exports] == ["model.onnx", "model.int8.onnx"]
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before

    # The same export again is refused, naming the version that has it.
    assert main(["export", str(source)]) == 2
    assert f"as {NAME} version 2 " in capsys.readouterr().err

    # Without the training run, agreement needs --data, and the error says so.
    splits_file = run["run"] / "splits.json"
    saved = splits_file.read_bytes()
    splits_file.unlink()
    try:
        with pytest.raises(ConfigError, match="no longer has splits.json.*--data DIR"):
            export_version(source, ExportConfig(force=True), log=_quiet)
        ref = export_version(source, ExportConfig(force=True), data_dir=run["data"], log=_quiet)
    finally:
        splits_file.write_bytes(saved)
    meta = read_metadata(ref.path)
    assert ref.version == 3 and [e.file for e in meta.exports] == ["model.onnx"]
    assert meta.model_extra is not None
    assert meta.model_extra["export"]["agreement_images"] == f"test split of {run['data']}"


@pytest.mark.slow
def test_resuming_a_finished_run_does_not_publish_its_weights_again(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "models"
    publish_run(run["run"], repo, NAME, log=_quiet)
    argv = ["train", "--resume", str(run["run"]), "--publish", str(repo), "--publish-name", NAME,
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert f"already published as {NAME} version 1 " in capsys.readouterr().err
    assert list_versions(repo / NAME) == [1]
    assert main([*argv, "--force"]) == 0
    assert list_versions(repo / NAME) == [1, 2]


def test_the_publish_command_records_where_the_data_came_from(
    run: dict[str, Path], tmp_path: Path
) -> None:
    version = publish_run(run["run"], tmp_path, NAME, log=_quiet)
    data = read_metadata(version.path).data
    splits = DataSplits.load(run["run"] / "splits.json")
    assert data is not None
    assert Path(data.root) == Path(splits.root) and data.seed == splits.seed
