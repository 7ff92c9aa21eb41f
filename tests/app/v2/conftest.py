"""A real server for the Open Inference Protocol tests: uvicorn on loopback, in a thread.

In this process (not a subprocess) so that a test can hold the real inference thread and
let batches pile up (tests.app.conftest.inference_blocked), which makes batch formation
deterministic; the clients still talk to it over TCP, as any client would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.service import Service
from tests.app.conftest import link_tree, settings_for
from tests.deploy.serving import free_port


@dataclass(frozen=True)
class LiveServer:
    url: str  # host:port, as tritonclient takes it
    service: Service

    @property
    def base(self) -> str:
        return f"http://{self.url}"


@contextmanager
def live_server(repo: Path, **overrides: Any) -> Iterator[LiveServer]:
    app = create_app(settings_for(repo, **overrides))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    live = LiveServer(f"127.0.0.1:{port}", app.state.service)
    lifecycle = live.service.lifecycle
    try:
        deadline = time.monotonic() + 60
        while True:  # listening, and start-up done (whatever its outcome)
            assert thread.is_alive(), "the server thread exited"
            try:
                listening = httpx.get(f"{live.base}/health/live", timeout=2).status_code == 200
            except httpx.TransportError:
                listening = False
            if listening and (lifecycle.started or lifecycle.startup_error):
                break
            assert time.monotonic() < deadline, "the server never finished starting"
            time.sleep(0.05)
        yield live
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def module_repo(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("v2") / "models"
    link_tree(template_repo, repo)
    return repo


@pytest.fixture(scope="module")
def server(module_repo: Path) -> Iterator[LiveServer]:
    """One server for the module: MODEL v1 and v2 (default: latest), OTHER v1."""
    with live_server(module_repo) as live:
        yield live


@pytest.fixture
def make_server(repo: Path) -> Iterator[Callable[..., LiveServer]]:
    """Servers with their own repository and settings, stopped after the test."""
    stack: list[Any] = []

    def make(**overrides: Any) -> LiveServer:
        context = live_server(repo, **overrides)
        stack.append(context)
        return context.__enter__()

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)
