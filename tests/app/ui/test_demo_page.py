"""The newcomer's path: ``python -m app`` on an empty repository prints the page's URL,
the page shows the start-up while the demo model is trained and published, and then
classifies and explains an upload with the demo model, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.conftest import wait_until
from tests.app.test_explain import LEFT
from tests.app.ui.test_page import api, card, shoot, wait_overlays
from tests.deploy.serving import free_port, stop

pytestmark = pytest.mark.slow
DEMO = "waste-resnet18-cbam"
BOOTSTRAP_S = 300  # the demo trains for about 60 s, then exports; a busy 2-core CI is slower


@pytest.fixture
def first_run(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The README's first command, on an empty model repository; yields (URL, log)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WASTE_")}
    env |= {"WASTE_MODEL_DIR": str(tmp_path / "models"), "WASTE_PORT": str(port)}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield f"http://127.0.0.1:{port}/", log
    finally:
        stop(process)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def printed_url(log: Path) -> str:
    for line in log.read_text().splitlines():
        if line.startswith("Browser page: "):
            return line.split()[2]
    return ""


def test_the_first_command_serves_the_page_with_the_demo_model(
    page: Any, first_run: tuple[str, Path], tmp_path: Path, screenshots: Path
) -> None:
    url, log = first_run
    # The URL is printed and the page answers before the demo model exists.
    wait_until(lambda: printed_url(log) != "", 60, "the page's URL printed")
    assert printed_url(log) == url, log.read_text()[-2000:]
    wait_until(lambda: answers(url), 60, "the page served")
    page.goto(url)
    state = page.locator("#service-state")
    if httpx.get(url + "health/ready", timeout=5).status_code != 200:
        # Still bootstrapping: the page says so instead of showing an empty form.
        state.filter(has_text="no model is ready yet").or_(
            state.filter(has_text="service starting")
        ).wait_for(timeout=30_000)
    page.wait_for_function(
        "document.querySelector('#model').options.length > 0 && "
        "document.querySelector('#service-state').textContent === ''",
        timeout=BOOTSTRAP_S * 1000,
    )
    assert page.locator("#model").input_value() == DEMO
    upload = tmp_path / "left.png"
    upload.write_bytes(LEFT)
    page.set_input_files("#files", str(upload))
    wait_overlays(page, 1)
    expected = api(url, "v1/predict", upload)
    prediction = expected["predictions"][0]
    shown = card(page, "left.png")
    assert shown.locator(".label").inner_text() == prediction["label"]
    labels = [s["label"] for s in prediction["top_k"]]
    assert shown.locator(".bar-label").all_inner_texts() == labels
    answered = shown.locator(".answered-by").inner_text()
    assert answered.startswith(f"{DEMO} v1 · {expected['backend']} {expected['precision']} · ")
    assert shown.locator("img.overlay").get_attribute("src").startswith("data:image/png;base64,")
    shoot(page, screenshots, "page-demo-model.png")
