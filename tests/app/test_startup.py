"""Start-up: liveness at once, readiness only after warm-up, clear start-up failures."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.service import Service, StartupError
from tests.app.conftest import (
    MODEL,
    files,
    image_bytes,
    publish_random,
    settings_for,
    wait_ready,
    wait_until,
)
from tests.app.test_api import assert_error
from tests.app.test_overload import inference_blocked


def test_liveness_answers_while_models_load_and_readiness_waits(repo: Path) -> None:
    with TestClient(create_app(settings_for(repo))) as client:
        service: Service = client.app.state.service  # type: ignore[attr-defined]
        with inference_blocked(service):  # warm-up runs on the inference thread
            assert client.get("/health/live").status_code == 200
            response = client.get("/health/ready")
            assert_error(response, 503, "not_ready", "loading models")
            assert response.headers["retry-after"].isdigit()
            assert_error(client.post("/v1/predict"), 503, "no_ready_version")
        wait_ready(client)


def test_empty_repository_without_training_extras_fails_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "training.demo", None)  # as if it could not be imported
    app = create_app(settings_for(tmp_path / "models", bootstrap_demo=True))
    with pytest.raises(StartupError) as info, TestClient(app):
        pass
    message = str(info.value)
    assert "holds no model" in message
    assert "pip install '.[train]'" in message
    assert "WASTE_BOOTSTRAP_DEMO=0" in message
    assert "publish a model" in message


def test_missing_repository_without_bootstrap_fails(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path / "nowhere"))
    with pytest.raises(StartupError, match="does not exist"), TestClient(app):
        pass
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with (
        pytest.raises(StartupError, match="not a directory"),
        TestClient(create_app(settings_for(a_file))),
    ):
        pass


def test_empty_repository_without_bootstrap_starts_unready(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with TestClient(create_app(settings_for(tmp_path / "models"))) as client:
        service: Service = client.app.state.service  # type: ignore[attr-defined]
        wait_until(lambda: service.started, what="start-up")
        assert_error(client.get("/health/ready"), 503, "not_ready", "not in the model repository")
        assert client.get("/v1/models").json()["models"] == []


def test_empty_repository_is_bootstrapped_once_even_with_two_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring around ``training.demo.bootstrap_demo`` (tests/training covers the demo).

    A real, faster bootstrapper stands in for the one-minute demo training: it publishes a
    randomly initialised version with publish_version. Two apps start on the same empty
    repository at once, as two uvicorn workers would; exactly one version gets published.
    """
    calls: list[str] = []

    def bootstrap_demo(repo: Path, name: str, log: Callable[[str], None]) -> None:
        calls.append(name)
        log("publishing a demo version")
        time.sleep(0.3)  # long enough for the other worker to reach the lock
        publish_random(repo, name, seed=7)

    demo = types.ModuleType("training.demo")
    demo.bootstrap_demo = bootstrap_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "training.demo", demo)
    repo = tmp_path / "models"
    settings = settings_for(repo, bootstrap_demo=True)
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        assert_error(first.get("/health/ready"), 503, "not_ready", "synthetic images")
        wait_ready(first)
        wait_ready(second)
        for client in (first, second):
            assert client.get("/health/ready").json()["models"] == {MODEL: 1}
        assert first.post("/v1/predict", files=files(("a.jpg", image_bytes()))).status_code == 200
    assert calls == [MODEL]
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == ["1"]
