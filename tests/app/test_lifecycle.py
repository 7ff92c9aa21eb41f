"""Start-up and shutdown: liveness at once, readiness only after warm-up, failures reported."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.lifecycle import without_folders
from app.main import create_app
from app.service import Service
from tests.app.conftest import (
    files,
    image_bytes,
    inference_blocked,
    settings_for,
    wait_ready,
    wait_until,
)
from tests.app.test_api import assert_error


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


def test_before_start_up_every_use_case_is_a_503_not_ready(repo: Path) -> None:
    client = TestClient(create_app(settings_for(repo)))  # no `with`: the lifespan never runs
    assert client.get("/health/live").status_code == 200
    for response in (
        client.get("/health/ready"),
        client.get("/v1/models"),
        client.post("/v1/predict", files=files(("a.jpg", image_bytes()))),
    ):
        assert_error(response, 503, "not_ready", "the service is starting")
        assert response.headers["retry-after"] == "1"


def test_empty_repository_without_bootstrap_starts_unready(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with TestClient(create_app(settings_for(tmp_path / "models"))) as client:
        lifecycle = client.app.state.service.lifecycle  # type: ignore[attr-defined]
        wait_until(lambda: lifecycle.started, what="start-up")
        assert_error(client.get("/health/ready"), 503, "not_ready", "not in the model repository")
        assert client.get("/v1/models").json()["models"] == []


def test_absolute_paths_are_cut_to_their_last_component() -> None:
    message = "OSError: [Errno 13] Permission denied: '/srv/models/demo/1' (see /tmp/x.log)"
    expected = "OSError: [Errno 13] Permission denied: '1' (see x.log)"
    assert without_folders(message) == expected
    assert without_folders("ratio 1/2 of a/b kept") == "ratio 1/2 of a/b kept"


def test_a_failed_start_up_keeps_the_service_alive_unready_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bootstrap_demo(repo: Path, name: str, log: object) -> None:
        raise OSError(f"No space left on device: '{repo / name / '1' / 'weights.tmp'}'")

    demo = types.ModuleType("training.demo")
    demo.bootstrap_demo = bootstrap_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "training.demo", demo)
    settings = settings_for(tmp_path / "models", bootstrap_demo=True)
    with TestClient(create_app(settings)) as client:
        lifecycle = client.app.state.service.lifecycle  # type: ignore[attr-defined]
        wait_until(lambda: lifecycle.startup_error is not None, what="start-up failure")
        assert lifecycle.started is False and lifecycle.stage == "start-up failed"
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert_error(ready, 503, "not_ready", "start-up failed: OSError: No space left on device")
        # The server's folders stay private; the file's name is enough to act on.
        assert ready.json()["error"]["message"].endswith("device: 'weights.tmp'")
        assert str(tmp_path) not in ready.text
        assert ready.headers["retry-after"] == "30"
        predict = client.post("/v1/predict", files=files(("a.jpg", image_bytes())))
        assert_error(predict, 503, "not_ready", "not ready: start-up failed")
