"""SIGTERM, as `docker stop` sends it: stop accepting, finish in-flight requests, exit 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.serving import DEFAULT_MODEL, free_port, png_bytes, stop, wait_ready
from tests.deploy.specs import REPO

GRACE_S = 20
# One image waits this long in the batcher for others to join: a request that is
# reliably still in flight when the signal arrives.
BATCH_DELAY_MS = 4000


def queue_depth(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "waste_queue_depth":
            return sum(s.value for s in family.samples)
    raise AssertionError("/metrics has no waste_queue_depth gauge")


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_drains_the_in_flight_request_and_exits_0(
    tiny_model_repo: Path, tmp_path: Path
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "WASTE_HOST": "127.0.0.1",
        "WASTE_PORT": str(port),
        "WASTE_MODEL_DIR": str(tiny_model_repo),
        "WASTE_BOOTSTRAP_DEMO": "false",
        "WASTE_MAX_BATCH_SIZE": "8",
        "WASTE_MAX_BATCH_DELAY_MS": str(BATCH_DELAY_MS),
        "WASTE_REQUEST_TIMEOUT_S": "60",
        "WASTE_GRACEFUL_SHUTDOWN_S": str(GRACE_S),
        "WASTE_TORCH_THREADS": "1",
        "WASTE_DECODE_THREADS": "1",
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_ready(base_url, server, log, timeout=120)
        result: dict[str, Any] = {}

        def predict() -> None:
            try:
                response = httpx.post(
                    f"{base_url}/v1/predict",
                    files=[("files", ("bottle.png", png_bytes(), "image/png"))],
                    timeout=60,
                )
                result.update(status=response.status_code, body=response.json())
            except Exception as exc:  # reported by the assertions below
                result["error"] = repr(exc)
            result["finished"] = time.monotonic()

        client = threading.Thread(target=predict)
        client.start()
        deadline = time.monotonic() + 3
        while queue_depth(base_url) < 1:
            assert time.monotonic() < deadline, "the request never reached the batcher"
            time.sleep(0.05)

        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The listening socket closes at once: new connections are refused ...
        deadline = signalled + 3
        while not connection_refused(port):
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        # ... while the request that was already in flight is still being served.
        assert client.is_alive(), f"the request ended before the check: {result}"

        client.join(timeout=GRACE_S + 10)
        assert result.get("status") == 200, result
        body = result["body"]
        assert (body["model"], body["version"]) == (DEFAULT_MODEL, 1)
        assert [p["status"] for p in body["predictions"]] == ["ok"]
        assert result["finished"] - signalled < GRACE_S

        code = server.wait(timeout=GRACE_S + 10)
        exited = time.monotonic() - signalled
        output = log.read_text()
        assert code == 0, output[-3000:]
        assert exited < GRACE_S, f"exit took {exited:.1f} s, the grace period is {GRACE_S} s"
        assert "timeout graceful shutdown exceeded" not in output
    finally:
        stop(server)
