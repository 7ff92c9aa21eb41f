"""Uploads over real sockets: memory bound, refusal before reading, timeouts, clients that leave.

Each test starts the app in a uvicorn server on loopback (tests/app/live.py) and talks raw
HTTP/1.1, so it can hold a body back, send it slowly, or close the connection mid-wait.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.main import create_app
from app.service import Service
from tests.app.conftest import (
    MODEL,
    image_bytes,
    inference_blocked,
    settings_for,
    wait_until,
)
from tests.app.live import (
    Response,
    answered,
    connect,
    live_server,
    multipart,
    part,
    post_head,
    read_response,
    send_slowly,
)

MiB = 1024 * 1024
JPEG = image_bytes("JPEG")


@contextmanager
def serving(repo: Path, **overrides: Any) -> Iterator[tuple[int, Service]]:
    app = create_app(settings_for(repo, **overrides))
    with live_server(app) as port:
        service = app.state.service
        assert isinstance(service, Service)
        yield port, service


def noise_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


class LivenessProbe(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            started = time.perf_counter()
            with connect(self.port) as conn:
                conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_response(conn).status == 200
            self.latencies.append(time.perf_counter() - started)


def test_concurrent_large_uploads_are_held_to_the_upload_memory_bound(repo: Path) -> None:
    limit = 4 * MiB
    body = multipart(("noise.png", noise_png(560, seed=1)))  # about 0.9 MiB
    fits = limit // len(body)
    results: list[tuple[float, float, bool, Response]] = []

    def upload() -> None:
        with connect(port) as conn:
            started = time.monotonic()
            conn.sendall(post_head(len(body)))
            complete = send_slowly(conn, body, 64 * 1024, pause_s=0.015)
            sent = time.monotonic()
            results.append((started, sent, complete, read_response(conn)))

    settings = {
        "max_upload_memory_bytes": limit,
        "max_request_bytes": MiB,
        "max_file_bytes": MiB,
        "max_queue_images": 64,
    }
    with serving(repo, **settings) as (port, service):
        memory = service.predictor.upload_memory
        probe = LivenessProbe(port)
        probe.start()
        clients = [threading.Thread(target=upload) for _ in range(16)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)
        probe.stop.set()
        probe.join(10)
        assert memory.in_use == 0
    assert len(results) == 16
    accepted = [(a, b) for a, b, complete, r in results if r.status == 200]
    refused = [(complete, r) for _, _, complete, r in results if r.status != 200]
    assert len(accepted) >= fits and refused, [r.status for *_, r in results]
    for complete, response in refused:
        assert response.status == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "upload_memory_full"
        assert not complete  # answered before its body was sent
    # Held to the bound, seen from both sides: the service's own account, and the bodies
    # the clients got to upload at the same time (+1: a body sent in full and one whose
    # headers are on their way can overlap for an instant).
    assert memory.peak <= limit
    assert max_overlap(accepted) <= fits + 1
    assert probe.latencies and max(probe.latencies) < 1.0, max(probe.latencies)


def test_a_request_for_a_full_queue_is_refused_before_its_files_are_read(repo: Path) -> None:
    overrides = {"max_batch_size": 1, "max_queue_images": 3, "max_files_per_request": 3}
    with serving(repo, **overrides) as (port, service):
        batcher = service.lifecycle.require_registry().resolve(MODEL, None)[1].batcher
        single = multipart(("a.jpg", JPEG))
        waiting: list[socket.socket] = []
        with inference_blocked(service):
            for expected_depth in (0, 1, 2):  # one running (blocked), then two waiting
                conn = connect(port)
                conn.sendall(post_head(len(single)) + single)
                waiting.append(conn)
                wait_until(lambda d=expected_depth: batcher.queue_depth == d)
            wait_until(lambda: batcher.in_flight == 3)
            # One slot left: the first file takes it, the second cannot get one, so the
            # answer comes before the second file's bytes are sent.
            first, second = part("1.jpg", JPEG), part("2.jpg", JPEG)
            total = len(first) + len(second) + len(b"--liveboundary7f3a--\r\n")
            with connect(port, timeout=10) as conn:
                header_end = second.index(b"\r\n\r\n") + 4
                conn.sendall(post_head(total) + first + second[:header_end])
                response = read_response(conn)
            assert response.status == 503
            assert response.json()["error"]["code"] == "overloaded"
            assert batcher.reserved == 0 and batcher.queue_depth == 2
            # No slot at all: refused on its headers alone.
            conn = connect(port)
            conn.sendall(post_head(len(single)) + single)
            waiting.append(conn)
            wait_until(lambda: batcher.queue_depth == 3)
            with connect(port, timeout=10) as conn:
                conn.sendall(post_head(len(single)) + single[:100])
                wait_until(lambda: answered(conn), 5, "an answer before the body")
                assert read_response(conn).json()["error"]["code"] == "overloaded"
        for conn in waiting:
            assert read_response(conn).status == 200
            conn.close()


def test_a_stalled_upload_is_answered_408_and_gives_back_what_it_held(repo: Path) -> None:
    with serving(repo, body_timeout_s=0.5) as (port, service):
        batcher = service.lifecycle.require_registry().resolve(MODEL, None)[1].batcher
        body = multipart(("a.jpg", JPEG))
        with connect(port, timeout=10) as conn:
            started = time.monotonic()
            conn.sendall(post_head(len(body)) + body[: len(body) // 2])
            wait_until(lambda: upload_memory(port) == len(body), 5, "the body's memory held")
            response = read_response(conn)
            elapsed = time.monotonic() - started
            assert conn.recv(1) == b""  # and the connection is closed
        assert response.status == 408
        assert response.json()["error"]["code"] == "body_timeout"
        assert "WASTE_BODY_TIMEOUT_S" in response.json()["error"]["message"]
        assert 0.5 <= elapsed < 5.0
        assert service.predictor.upload_memory.in_use == upload_memory(port) == 0
        assert batcher.reserved == 0


def upload_memory(port: int) -> float:
    """The waste_upload_memory_bytes gauge, as a scrape reads it."""
    with connect(port) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = read_response(conn).body.decode()
    line = next(x for x in text.splitlines() if x.startswith("waste_upload_memory_bytes "))
    return float(line.split()[1])


def test_images_of_clients_that_disconnected_are_never_run(repo: Path) -> None:
    with serving(repo, max_batch_size=4) as (port, service):
        batcher = service.lifecycle.require_registry().resolve(MODEL, None)[1].batcher
        body = multipart(("a.jpg", JPEG))
        before = batcher.processed
        with inference_blocked(service):
            stays = connect(port)
            stays.sendall(post_head(len(body)) + body)
            wait_until(lambda: batcher.in_flight == 1 and batcher.queue_depth == 0)
            leaving = [connect(port) for _ in range(3)]
            for conn in leaving:
                conn.sendall(post_head(len(body)) + body)
            wait_until(lambda: batcher.queue_depth == 3, what="three images queued")
            for conn in leaving:
                conn.close()
            wait_until(lambda: batcher.queue_depth == 0, 5, "the images of gone clients dropped")
            assert batcher.reserved == 0
        assert read_response(stays).status == 200
        stays.close()
        assert batcher.processed - before == 1
        with connect(port) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            metrics = read_response(conn).body.decode()
        assert f'waste_requests_total{{model="{MODEL}",status="499",version="2"}} 3.0' in metrics


def test_explain_shares_the_upload_memory_bound_with_predict(repo: Path) -> None:
    settings = {"max_upload_memory_bytes": MiB, "max_request_bytes": MiB, "max_file_bytes": MiB}
    with serving(repo, **settings) as (port, service):
        memory = service.predictor.upload_memory
        body = multipart(("a.jpg", JPEG))
        explain = f"/v1/models/{MODEL}/versions/2/explain"
        with connect(port, timeout=10) as holder:
            holder.sendall(post_head(MiB - 10) + b"--liveboundary")  # predict holds it, stalled
            wait_until(lambda: memory.in_use == MiB - 10, 5, "the predict body's memory held")
            with connect(port, timeout=10) as conn:
                conn.sendall(post_head(len(body), explain))  # headers only: refused at once
                response = read_response(conn)
        assert response.status == 503
        assert response.json()["error"]["code"] == "upload_memory_full"
        wait_until(lambda: memory.in_use == 0, 5, "memory given back")
        with connect(port, timeout=30) as conn:
            conn.sendall(post_head(len(body), explain) + body)
            assert read_response(conn).status == 200
        assert memory.in_use == 0
