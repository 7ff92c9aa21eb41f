"""Start-up and shutdown: liveness at once, readiness only after warm-up, failures reported."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.service import Service
from tests.app.conftest import (
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


def test_empty_repository_without_bootstrap_starts_unready(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with TestClient(create_app(settings_for(tmp_path / "models"))) as client:
        lifecycle = client.app.state.service.lifecycle  # type: ignore[attr-defined]
        wait_until(lambda: lifecycle.started, what="start-up")
        assert_error(client.get("/health/ready"), 503, "not_ready", "not in the model repository")
        assert client.get("/v1/models").json()["models"] == []
