"""A real uvicorn server in this process, on loopback, and a raw HTTP/1.1 client for it.

For behaviour that only shows over a socket: a client that stops sending or goes away, a
response that arrives before the body was sent, many uploads at once. The server runs in
a thread with its own event loop; the test reaches the app's objects (batchers, upload
memory) directly, as with TestClient.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from tests.app.conftest import wait_until

BOUNDARY = "liveboundary7f3a"


@contextmanager
def live_server(app: FastAPI, timeout: float = 60.0) -> Iterator[int]:
    """Serve ``app`` on 127.0.0.1 until the block ends; yield the port once it is ready."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout, "the server to start")
        wait_until(lambda: ready(port), timeout, "readiness")
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def ready(port: int) -> bool:
    with connect(port) as conn:
        conn.sendall(b"GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_response(conn).status == 200


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def part(filename: str, data: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"'
            "\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
    )


def multipart(*files: tuple[str, bytes]) -> bytes:
    return b"".join(part(name, data) for name, data in files) + f"--{BOUNDARY}--\r\n".encode()


def post_head(length: int, path: str = "/v1/predict") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def read_response(conn: socket.socket) -> Response:
    """Read one response (Content-Length framed, as every answer of the service is)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the response body")
        body += chunk
    return Response(int(lines[0].split()[1]), headers, body[:length])


def answered(conn: socket.socket) -> bool:
    """Whether the server has sent something (or closed) on ``conn``, without blocking."""
    readable, _, _ = select.select([conn], [], [], 0)
    return bool(readable)


def send_slowly(conn: socket.socket, data: bytes, chunk: int, pause_s: float) -> bool:
    """Send ``data`` in pieces; stop early (return False) once the server has answered."""
    for start in range(0, len(data), chunk):
        if answered(conn):
            return False
        conn.sendall(data[start : start + chunk])
        time.sleep(pause_s)
    return True
