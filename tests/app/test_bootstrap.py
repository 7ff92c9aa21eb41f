"""Start-up checks of the repository and the demo bootstrap: clear failures, built once."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.bootstrap import StartupError
from app.main import create_app
from tests.app.conftest import (
    MODEL,
    files,
    image_bytes,
    publish_random,
    settings_for,
    wait_ready,
)
from tests.app.test_api import assert_error


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
