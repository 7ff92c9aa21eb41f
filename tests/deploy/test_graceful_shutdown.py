"""SIGTERM, as `docker stop` sends it: stop accepting, finish in-flight requests, exit 0.

New connections are refused (not reset) with one worker or several, and a request still
running when the grace period ends gets the JSON error shape and 503.
"""

from __future__ import annotations

import json
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
import pytest
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


def probe(port: int) -> str:
    """One new connection after SIGTERM: 'answered', 'refused', 'reset' or 'no answer'."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = conn.recv(65536)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "no answer"
    return "answered" if head.startswith(b"HTTP/1.1 200") else f"other {head[:60]!r}"


def read_answer(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


@pytest.mark.parametrize("workers", [1, 2])
def test_after_sigterm_connections_are_refused_and_a_stalled_upload_gets_a_json_503(
    workers: int, tiny_model_repo: Path, tmp_path: Path
) -> None:
    grace_s = 3
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "WASTE_PORT": str(port),
        "WASTE_MODEL_DIR": str(tiny_model_repo),
        "WASTE_BOOTSTRAP_DEMO": "false",
        "WASTE_WORKERS": str(workers),
        "WASTE_GRACEFUL_SHUTDOWN_S": str(grace_s),
        "WASTE_BODY_TIMEOUT_S": "600",  # the upload below stalls until the grace runs out
        "WASTE_TORCH_THREADS": "1",
        "WASTE_DECODE_THREADS": "1",
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, log, timeout=120)
        boundary = "stalledboundary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="a.png"\r\n\r\n'
        ).encode() + png_bytes()
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body) + 100}"
            f"\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=grace_s + 20) as stalled:
            stalled.sendall(head + body)  # and never the rest
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            outcomes = []
            while time.monotonic() - signalled < 2.0:
                outcomes.append(probe(port))
                time.sleep(0.05)
            answer = read_answer(stalled)
        code = server.wait(timeout=grace_s + 30)
        output = log.read_text()
    finally:
        stop(server)
    # A connection that arrives the very instant the last listening socket closes can be
    # reset (uvicorn, any number of workers); every other one is answered or refused.
    failed = [o for o in outcomes if o != "answered" and o != "refused"]
    assert len(failed) <= 1, outcomes
    assert outcomes[-5:] == ["refused"] * 5, outcomes
    status, _, payload = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"retry-after: 1" in status.lower()
    error = json.loads(payload)["error"]
    assert error["code"] == "shutting_down" and "WASTE_GRACEFUL_SHUTDOWN_S" in error["message"]
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
