"""One real server: ``python -m app`` (uvicorn) on loopback, in a subprocess.

It runs with the training extras (scikit-learn, matplotlib, tqdm) made unimportable, so
serving proves it never needs them; it answers readiness and predictions over TCP; and on
SIGTERM it finishes the request in flight and exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx

from tests.app.conftest import MODEL, image_bytes

EXTRAS = ("sklearn", "matplotlib", "tqdm")

LAUNCHER = textwrap.dedent(
    f"""
    import atexit, importlib.abc, importlib.machinery, runpy, sys

    EXTRAS = {EXTRAS!r}

    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"blocked training extra: {{spec.name}}")

        def exec_module(self, module):
            raise ImportError(f"blocked training extra: {{module.__name__}}")

    class BlockTrainingExtras(importlib.abc.MetaPathFinder):
        # Found (so probes with find_spec see a module) but never importable.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in EXTRAS:
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, BlockTrainingExtras())
    atexit.register(
        lambda: print("EXTRAS-IMPORTED:", sorted(
            m for m in sys.modules if m.split(".")[0] in EXTRAS
        ), flush=True)
    )
    runpy.run_module("app", run_name="__main__", alter_sys=True)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multipart(boundary: str, name: str, data: bytes) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_real_server_serves_without_training_extras_and_drains_on_sigterm(
    repo: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WASTE_")}
    env |= {
        "WASTE_MODEL_DIR": str(repo),
        "WASTE_BOOTSTRAP_DEMO": "0",
        "WASTE_PORT": str(port),
        "WASTE_MAX_BATCH_SIZE": "2",
        "WASTE_TORCH_THREADS": "1",
        "WASTE_GRACEFUL_SHUTDOWN_S": "20",
        "WASTE_LOG_LEVEL": "info",
    }
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)

        jpeg = image_bytes("JPEG")
        response = httpx.post(f"{base}/v1/predict", files={"files": ("a.jpg", jpeg)}, timeout=30)
        assert response.status_code == 200
        assert (response.json()["model"], response.json()["version"]) == (MODEL, 2)

        # A request in flight: headers and half the body sent, then SIGTERM.
        boundary = uuid.uuid4().hex
        body = multipart(boundary, "late.jpg", jpeg)
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(head + body[: len(body) // 2])
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None, "exited with a request in flight"
            conn.sendall(body[len(body) // 2 :])
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'"late.jpg"' in answer
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = Path(log.name).read_text()
    assert "EXTRAS-IMPORTED: []" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
