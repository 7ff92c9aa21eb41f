"""Readiness as typed answers: the default version of every model, or of one model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.errors import NotFound, Unavailable
from app.schemas import Readiness
from tests.app.conftest import MODEL, OTHER, files, image_bytes, service_of

MakeClient = Callable[..., TestClient]


def test_ready_names_the_default_version_of_every_model_or_of_one(
    repo: Path, make_client: MakeClient
) -> None:
    # The default is the 'production' alias (v1), not the highest version (v2).
    (repo / MODEL / "aliases.json").write_text(json.dumps({"production": 1}))
    health = service_of(make_client()).health
    assert health.ready() == Readiness(models={MODEL: 1, OTHER: 1})
    assert health.ready(MODEL) == Readiness(models={MODEL: 1})
    assert health.ready(OTHER) == Readiness(models={OTHER: 1})
    with pytest.raises(NotFound) as unknown:
        health.ready("nope")
    assert unknown.value.code == "unknown_model"


def test_one_model_is_ready_while_the_service_lacks_its_default_model(
    make_client: MakeClient,
) -> None:
    health = service_of(make_client(ready=False, default_model="not-published")).health
    assert health.ready(OTHER) == Readiness(models={OTHER: 1})
    with pytest.raises(Unavailable) as info:
        health.ready()
    error = info.value
    assert error.code == "not_ready" and error.headers["Retry-After"] == "5"
    assert error.details is not None
    [reason] = error.details["reasons"]
    assert reason.startswith("the default model 'not-published' is not in the model repository")
    assert f"models: {OTHER}, {MODEL})" in reason


def test_another_models_problem_never_takes_the_service_out_of_readiness(
    repo: Path, make_client: MakeClient
) -> None:
    # The other model's production alias points at a version that is not there.
    (repo / OTHER / "aliases.json").write_text(json.dumps({"production": 9}))
    client = make_client()
    ready = client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["models"] == {MODEL: 2, OTHER: None}
    assert "points to version 9" in ready.json()["not_ready"][OTHER]
    other = client.get(f"/health/ready/{OTHER}")
    assert other.status_code == 503 and "points to version 9" in other.json()["error"]["message"]
    assert client.post("/v1/predict", files=files(("a.jpg", image_bytes()))).status_code == 200
    health = service_of(client).health
    assert health.ready(MODEL) == Readiness(models={MODEL: 2})


def test_the_default_models_problem_is_the_services(repo: Path, make_client: MakeClient) -> None:
    (repo / MODEL / "aliases.json").write_text(json.dumps({"production": 9}))
    health = service_of(make_client(ready=False)).health
    with pytest.raises(Unavailable) as info:
        health.ready()
    assert info.value.code == "not_ready"
    assert info.value.details == {
        "reasons": [
            f"alias 'production' of model {MODEL!r} points to version 9, which is not in the "
            "model repository"
        ]
    }
    assert health.ready(OTHER) == Readiness(models={OTHER: 1})
