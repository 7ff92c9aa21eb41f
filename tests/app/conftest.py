"""Fixtures for the service tests: small real model versions and running apps.

Versions are written by ``wastenet.artifacts.publish_version`` from randomly initialised
ResNet-18-CBAM networks at 32 px (fast on CPU). They are published once per session into
a template repository; each test gets its own repository made of hard links to those
files (instant), so tests can add, break or remove versions without touching others.
A test that changes a file must replace it (write a new file), never edit it in place.
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

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.service import Service
from app.settings import Settings, load_settings
from wastenet.artifacts import publish_version
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model
from wastenet.schema import Preprocessing

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


def publish_random(repo: Path, name: str, seed: int, cbam: str = "block") -> Path:
    torch.manual_seed(seed)
    config = ModelConfig(cbam=cbam)  # type: ignore[arg-type]
    ref = publish_version(
        repo,
        name,
        build_model(config),
        config,
        CLASS_NAMES,
        _evaluation(0.5 + seed / 100),
        PREPROCESSING,
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
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    tmp = model_dir / ".tmp-copy"
    link_tree(source, tmp)
    target = model_dir / str(max(versions, default=0) + 1)
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
