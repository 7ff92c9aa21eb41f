"""A real server on loopback and headless Chromium, for tests that drive the page.

Chromium is Debian's ``chromium`` package, driven by Playwright's Python package through
``executable_path``: Playwright downloads no browser here. Where Chromium is missing it
is installed with apt-get, as the image tests install their Docker engine (root and
apt-get needed; without them the tests skip, saying why). Screenshots go to
``<pytest's temporary directory>/ui-screenshots/`` (the path is printed; see with ``-s``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.app.test_explain import publish_explain_repo
from tests.deploy.engine import apt_install
from tests.deploy.serving import free_port, stop, wait_ready

CHROMIUM_NAMES = ("chromium", "chromium-browser")
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


def chromium_missing_reason() -> str | None:
    """Why Chromium cannot be installed here, or None."""
    if sys.platform != "linux":
        return f"Debian's chromium is for Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return f"installing chromium with apt-get needs root, this is uid {os.geteuid()}"
    if shutil.which("apt-get") is None:
        return "no apt-get to install Debian's chromium"
    return None


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        reason = chromium_missing_reason()
        if reason is not None:
            pytest.skip(f"Chromium is not installed and cannot be: {reason}")
        apt_install(["chromium"], log=lambda line: print(line, flush=True))
        found = find_chromium()
        assert found is not None, "apt-get installed chromium, but no chromium is on PATH"
    return found


@pytest.fixture(scope="session")
def browser(chromium: str) -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is in the dev extra: pip install -e '.[dev]'"
    )
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that fails the test on a script error or a request off this machine."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))

    def only_loopback(route: Any) -> None:
        host = urlsplit(route.request.url).hostname or ""
        if route.request.url.startswith("data:") or host in LOOPBACK:
            route.continue_()
        else:
            problems.append(f"request off this machine: {route.request.url}")
            route.abort()

    page.route("**/*", only_loopback)
    yield page
    context.close()
    assert problems == []


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "ui-screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def ui_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The explain tests' versions: 96 px MODEL v1 (production) and v2, PLAIN v1 (no CBAM)."""
    return publish_explain_repo(tmp_path_factory.mktemp("ui") / "models")


@pytest.fixture(scope="module")
def server(ui_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m app`` on loopback; yields its base URL (ending in /)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WASTE_")}
    env |= {
        "WASTE_MODEL_DIR": str(ui_repo),
        "WASTE_BOOTSTRAP_DEMO": "0",
        "WASTE_PORT": str(port),
        "WASTE_TORCH_THREADS": "1",
        "WASTE_LOG_LEVEL": "warning",
        "WASTE_ACCESS_LOG": "0",
    }
    log = tmp_path_factory.mktemp("ui-server") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log, timeout=90)
        yield base + "/"
    finally:
        stop(process)
    output = log.read_text()
    assert f"Browser page: {base}/" in output, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
