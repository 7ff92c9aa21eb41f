"""Settings: defaults, environment parsing, precise errors, and the entry point's checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app.__main__ import main
from app.selection import resolve_device
from app.settings import Settings, SettingsError, describe_settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("WASTE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert str(settings.model_dir) == "models"
    assert settings.default_model == "waste-resnet18-cbam"
    assert settings.device == "auto" and settings.precision == "auto"
    assert settings.backend == "auto" and settings.cuda_graphs is False
    assert settings.jpeg_draft is True
    assert settings.bootstrap_demo is True and settings.poll_interval_s == 0
    assert settings.admin_token is None and not settings.admin_enabled
    assert settings.max_queue_images >= settings.max_files_per_request
    assert settings.max_file_bytes <= settings.max_request_bytes


def test_environment_is_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASTE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("WASTE_DEVICE", "CUDA:1")
    monkeypatch.setenv("WASTE_BOOTSTRAP_DEMO", "0")
    monkeypatch.setenv("WASTE_ADMIN_TOKEN", "")
    settings = load_settings()
    assert settings.max_batch_size == 16
    assert settings.device == "cuda:1"
    assert settings.bootstrap_demo is False
    assert settings.admin_token is None


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"WASTE_MAX_BATCH_SIZE": "0"}, ["WASTE_MAX_BATCH_SIZE='0'", "greater than or equal to 1"]),
        ({"WASTE_DEVICE": "gpu"}, ["WASTE_DEVICE='gpu'", "auto, cpu, cuda or cuda:N"]),
        ({"WASTE_PRECISION": "fp8"}, ["WASTE_PRECISION='fp8'", "'int8'"]),
        ({"WASTE_BACKEND": "tensorrt"}, ["WASTE_BACKEND='tensorrt'", "'onnxruntime'"]),
        ({"WASTE_DEFAULT_MODEL": "Bad Name"}, ["WASTE_DEFAULT_MODEL", "not a valid model name"]),
        ({"WASTE_ADMIN_TOKEN": "short"}, ["WASTE_ADMIN_TOKEN", "at least 16 characters"]),
        ({"WASTE_PORT": "70000"}, ["WASTE_PORT='70000'"]),
        ({"WASTE_POLL_INTERVAL_S": "-1"}, ["WASTE_POLL_INTERVAL_S"]),
        (
            {"WASTE_MAX_FILE_BYTES": "9000000", "WASTE_MAX_REQUEST_BYTES": "1000000"},
            ["max_file_bytes (9000000) exceeds max_request_bytes (1000000)"],
        ),
        (
            {"WASTE_MAX_QUEUE_IMAGES": "4", "WASTE_MAX_FILES_PER_REQUEST": "8"},
            ["max_queue_images (4) is below max_files_per_request (8)"],
        ),
    ],
)
def test_invalid_settings_name_the_variable_and_the_problem(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragments: list[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(SettingsError, match="settings"):
        load_settings(max_batch=3)


def test_misspelt_variables_are_refused_with_a_suggestion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WASTE_MAX_BATCHSIZE", "4")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "WASTE_MAX_BATCHSIZE: unknown setting (did you mean WASTE_MAX_BATCH_SIZE?)" in str(
        info.value
    )


def test_every_setting_is_documented() -> None:
    text = describe_settings()
    for field, info in Settings.model_fields.items():
        assert f"WASTE_{field.upper()}" in text
        assert info.description, field


def test_device_checks() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_entry_point_checks_settings_and_lists_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WASTE_MAX_BATCH_DELAY_MS", "-5")
    monkeypatch.setenv("WASTE_WORKERS", "0")
    assert main(["--check"]) == 2
    err = capsys.readouterr().err
    assert "WASTE_MAX_BATCH_DELAY_MS='-5'" in err and "WASTE_WORKERS='0'" in err
    assert "Traceback" not in err
    monkeypatch.delenv("WASTE_MAX_BATCH_DELAY_MS")
    monkeypatch.delenv("WASTE_WORKERS")
    monkeypatch.setenv("WASTE_PRECISION", "fp16")
    monkeypatch.setenv("WASTE_DEVICE", "cpu")
    assert main(["--check"]) == 2
    assert "WASTE_PRECISION=fp16 needs a CUDA device" in capsys.readouterr().err
    monkeypatch.setenv("WASTE_PRECISION", "int8")
    monkeypatch.setenv("WASTE_BACKEND", "torch")
    assert main(["--check"]) == 2
    assert "WASTE_PRECISION=int8 needs WASTE_BACKEND=onnxruntime" in capsys.readouterr().err
    for name in ("WASTE_PRECISION", "WASTE_DEVICE", "WASTE_BACKEND"):
        monkeypatch.delenv(name)
    assert main(["--check"]) == 0
    assert main(["--help-settings"]) == 0
    out = capsys.readouterr().out
    assert "WASTE_GRACEFUL_SHUTDOWN_S (default: 30)" in out


def test_the_readme_lists_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("### Settings", 1)[1].split("\n###", 1)[0]
    listed = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `WASTE_")}
    assert listed == {f"WASTE_{field.upper()}" for field in Settings.model_fields}
