"""Helpers for tests that run the service as a real process on loopback."""

from __future__ import annotations

import io
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.settings import Settings

DEFAULT_MODEL: str = Settings.model_fields["default_model"].default


def app_routes() -> set[tuple[str, str]]:
    """(path, METHOD) of every operation in the app's OpenAPI document."""
    from app.main import create_app

    app = create_app(Settings(model_dir=Path("models")))
    paths = app.openapi()["paths"]
    return {(path, method.upper()) for path, ops in paths.items() for method in ops}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def png_bytes(size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (40, 160, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_ready(base_url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> float:
    """Poll /health/ready until 200; return the seconds it took. Fail early if it exits."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            response = httpx.get(f"{base_url}/health/ready", timeout=2)
            if response.status_code == 200:
                return time.monotonic() - start
            last = f"{response.status_code} {response.text[:300]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.25)
    process.kill()
    pytest.fail(f"not ready after {timeout} s (last: {last}):\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Make sure a server started by a test is gone, whatever the test did."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
