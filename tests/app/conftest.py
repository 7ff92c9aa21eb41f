"""Fixtures for the service tests: small real model versions and running apps.

Versions are written by ``wastenet.artifacts.publish_version`` from randomly initialised
ResNet-18-CBAM networks at 32 px (fast on CPU). They are published once per session into
a template repository; each test gets its own repository made of hard links to those
files (instant), so tests can add, break or remove versions without touching others.
A test that changes a file must replace it (write a new file), never edit it in place.

``exported_repo``: a copy of MODEL v1 that also ships ``model.onnx`` (exported with
``torch.onnx.export``) and ``model.int8.onnx`` (``quantize_static``), recorded in its
model.json with their sha256. Exporting takes a while, so it happens once per session and
only when a test asks for it.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.backends import TorchBackend
from app.inference import InferenceModel
from app.main import create_app
from app.service import Service
from app.settings import Settings, load_settings
from wastenet.artifacts import (
    list_versions,
    load_version,
    publish_version,
    read_metadata,
    sha256_file,
)
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model
from wastenet.schema import (
    METADATA_FILE,
    ONNX_FILE,
    ONNX_INT8_FILE,
    AgreementReport,
    ClassAgreement,
    ExportedFile,
    Preprocessing,
    Quantization,
)

MODEL = "waste-resnet18-cbam"
OTHER = "other-model"
TOKEN = "test-admin-token-0123456789"
PREPROCESSING = Preprocessing(resize_size=36, input_size=32)


def _evaluation(accuracy: float) -> dict[str, Any]:
    return {
        "split": "test",
        "num_samples": 24,
        "accuracy": accuracy,
        "macro_f1": accuracy / 2,
        "per_class_f1": {c: accuracy / 2 for c in CLASS_NAMES},
    }


def publish_random(
    repo: Path, name: str, seed: int, cbam: str = "block", prep: Preprocessing = PREPROCESSING
) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig(cbam=cbam)  # type: ignore[arg-type]
    ref = publish_version(
        repo,
        name,
        build_model(config),
        config,
        CLASS_NAMES,
        _evaluation(0.5 + seed / 100),
        prep,
        training_config={"seed": seed},
        description=f"random init, seed {seed}",
    )
    return ref.path


@pytest.fixture(scope="session")
def template_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL v1, v2 (different random weights) and OTHER v1, published once."""
    repo = tmp_path_factory.mktemp("template") / "models"
    publish_random(repo, MODEL, seed=1)
    publish_random(repo, MODEL, seed=2)
    publish_random(repo, OTHER, seed=3, cbam="none")
    return repo


def torch_model(
    version_dir: Path, max_batch_size: int = 1, precision: str = "fp32"
) -> InferenceModel:
    """A version served by the torch backend on CPU, outside any app."""
    loaded = load_version(version_dir)
    backend = TorchBackend(
        loaded.model,
        torch.device("cpu"),
        precision,  # type: ignore[arg-type]
        loaded.metadata.preprocessing,
        len(loaded.metadata.class_names),
        max_batch_size,
    )
    return InferenceModel(loaded, backend, max_batch_size)


# -- exported versions ------------------------------------------------------------------
def export_onnx(version_dir: Path, target: Path) -> None:
    """The version's network as ONNX: normalised float32 NCHW in, logits out."""
    model = load_version(version_dir).model.eval()
    size = PREPROCESSING.input_size
    example = torch.zeros(2, 3, size, size)
    torch.onnx.export(
        model,
        (example,),
        str(target),
        dynamo=True,
        external_data=False,
        opset_version=18,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}},
        input_names=["input"],
        output_names=["logits"],
        verbose=False,
    )


def quantize_onnx(source: Path, target: Path, work: Path) -> None:
    """Static QDQ int8, calibrated on a few random normalised images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    size = PREPROCESSING.input_size
    rng = np.random.default_rng(0)
    batches = [{"input": rng.normal(0, 1, (1, 3, size, size)).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    prepared = work / "prepared.onnx"
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def exported_record(version_dir: Path, precision: str, top1: float = 1.0) -> ExportedFile:
    """The model.json entry of a file already in ``version_dir`` (its sha256 from disk)."""
    file = ONNX_INT8_FILE if precision == "int8" else ONNX_FILE
    quantization = agreement = None
    if precision == "int8":
        quantization = Quantization(
            method="onnxruntime static QDQ, per-channel",
            activation_type="QUInt8",
            weight_type="QInt8",
            calibration_source="random normal images (tests)",
            calibration_images=8,
        )
        agreement = AgreementReport(
            num_samples=24,
            top1_agreement=top1,
            max_prob_diff=0.05,
            per_class={
                c: ClassAgreement(num_samples=2, top1_agreement=top1, max_prob_diff=0.05)
                for c in CLASS_NAMES
            },
            threshold=0.99,
            forced=top1 < 0.99,
        )
    return ExportedFile(
        file=file,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        sha256=sha256_file(version_dir / file),
        opset=18,
        input_name="input",
        output_name="logits",
        quantization=quantization,
        agreement=agreement,
    )


def write_exports(version_dir: Path, exports: list[ExportedFile]) -> None:
    """Replace model.json with the same metadata listing ``exports``."""
    metadata = read_metadata(version_dir).model_copy(update={"exports": exports})
    replace_file(version_dir / METADATA_FILE, (metadata.model_dump_json(indent=2) + "\n").encode())


@pytest.fixture(scope="session")
def exported_template(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL v1's weights with model.onnx and model.int8.onnx, exported once."""
    work = tmp_path_factory.mktemp("export")
    repo = work / "models"
    version = repo / MODEL / "1"
    link_tree(template_repo / MODEL / "1", version)
    export_onnx(version, version / ONNX_FILE)
    quantize_onnx(version / ONNX_FILE, version / ONNX_INT8_FILE, work)
    write_exports(version, [exported_record(version, "fp32"), exported_record(version, "int8")])
    return repo


@pytest.fixture
def exported_repo(exported_template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "exported"
    link_tree(exported_template, dst)
    return dst


def link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


@pytest.fixture
def repo(template_repo: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "models"
    link_tree(template_repo, dst)
    return dst


def add_version(repo: Path, name: str, source: Path) -> Path:
    """Publish a copy of an existing version as the next number (atomic rename)."""
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / ".tmp-copy"
    link_tree(source, tmp)
    target = model_dir / str(max(list_versions(model_dir), default=0) + 1)
    os.rename(tmp, target)
    return target


def replace_file(path: Path, data: bytes) -> None:
    """Write new content without touching the (hard-linked) old inode."""
    path.unlink()
    path.write_bytes(data)


def settings_for(repo: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_dir": repo,
        "bootstrap_demo": False,
        "max_batch_size": 4,
        "max_batch_delay_ms": 2.0,
        "max_queue_images": 16,
        "max_files_per_request": 8,
        "torch_threads": 1,
        "decode_threads": 2,
        "log_level": "warning",
    }
    values.update(overrides)
    return load_settings(**values)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    wait_until(lambda: client.get("/health/ready").status_code == 200, timeout, "readiness")


def service_of(client: TestClient) -> Service:
    service = client.app.state.service  # type: ignore[attr-defined]
    assert isinstance(service, Service)
    return service


def wait_started(client: TestClient, timeout: float = 30.0) -> None:
    """Wait until start-up loading is over, whatever its outcome."""
    lifecycle = client.app.state.service.lifecycle  # type: ignore[attr-defined]
    wait_until(lambda: lifecycle.started or lifecycle.startup_error, timeout, "start-up")


@contextmanager
def inference_blocked(service: Service) -> Iterator[threading.Event]:
    """Occupy the real inference thread until the block ends (so batches pile up)."""
    gate = threading.Event()
    pool = service.lifecycle.inference_pool
    assert pool is not None
    pool.submit(gate.wait, 30)
    try:
        yield gate
    finally:
        gate.set()


@pytest.fixture
def make_client(repo: Path) -> Iterator[Callable[..., TestClient]]:
    """Start an app on ``repo`` with settings overrides; wait for readiness by default."""
    clients: list[TestClient] = []

    def make(ready: bool = True, **overrides: Any) -> TestClient:
        client = TestClient(create_app(settings_for(repo, **overrides)))
        client.__enter__()
        clients.append(client)
        if ready:
            wait_ready(client)
        else:
            wait_started(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def image_bytes(
    fmt: str = "JPEG",
    size: tuple[int, int] = (48, 40),
    mode: str = "RGB",
    color: Any = (200, 30, 30),
    **save: Any,
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]
