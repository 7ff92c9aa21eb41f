"""/v2 infer bodies over real sockets: the same memory bound, body timeout, refusal before
reading and vanished clients as /v1 predict, answered in the protocol's error shape."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from tests.app.conftest import MODEL, image_bytes, inference_blocked, wait_until
from tests.app.live import answered, connect, post_head, read_response
from tests.app.test_uploads_live import serving

MiB = 1024 * 1024
INFER = f"/v2/models/{MODEL}/infer"


def infer_head(length: int, path: str = INFER) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
        "Content-Type: application/json\r\n\r\n"
    ).encode()


def infer_body(n: int = 1) -> bytes:
    import base64

    image = base64.b64encode(image_bytes("PNG")).decode()
    tensor = {"name": "images", "shape": [n], "datatype": "BYTES", "data": [image] * n}
    return json.dumps({"inputs": [tensor]}).encode()


def protocol_error(response: Any) -> str:
    """The protocol's error shape is exactly ``{"error": "message"}``."""
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    message: str = body["error"]
    return message


def test_a_stalled_infer_body_is_answered_408_and_gives_back_its_memory(repo: Path) -> None:
    with serving(repo, body_timeout_s=0.5) as (port, service):
        memory = service.predictor.upload_memory
        body = infer_body()
        with connect(port, timeout=10) as conn:
            started = time.monotonic()
            conn.sendall(infer_head(len(body)) + body[: len(body) // 2])
            wait_until(lambda: memory.in_use == len(body), 5, "the body's memory held")
            response = read_response(conn)
            elapsed = time.monotonic() - started
        assert response.status == 408
        assert "WASTE_BODY_TIMEOUT_S" in protocol_error(response)
        assert 0.5 <= elapsed < 5.0
        assert memory.in_use == 0


def test_infer_shares_the_upload_memory_bound_with_predict(repo: Path) -> None:
    settings = {"max_upload_memory_bytes": MiB, "max_request_bytes": MiB, "max_file_bytes": MiB}
    with serving(repo, **settings) as (port, service):
        memory = service.predictor.upload_memory
        with connect(port, timeout=10) as holder:
            holder.sendall(post_head(MiB - 10) + b"--liveboundary")  # /v1 holds it, stalled
            wait_until(lambda: memory.in_use == MiB - 10, 5, "the /v1 body's memory held")
            body = infer_body()
            with connect(port, timeout=10) as conn:
                conn.sendall(infer_head(len(body)))  # only the headers: refused before the body
                response = read_response(conn)
        assert response.status == 503 and response.headers["retry-after"] == "1"
        assert "WASTE_MAX_UPLOAD_MEMORY_BYTES" in protocol_error(response)
        wait_until(lambda: memory.in_use == 0, 5, "memory given back")
        with connect(port, timeout=10) as conn:
            conn.sendall(infer_head(len(body)) + body)
            assert read_response(conn).status == 200


def test_infer_for_a_full_queue_is_refused_before_routing_in_the_protocol_shape(
    repo: Path,
) -> None:
    overrides = {"max_batch_size": 1, "max_queue_images": 1, "max_files_per_request": 1}
    with serving(repo, **overrides) as (port, service):
        batcher = service.lifecycle.require_registry().resolve(MODEL, None)[1].batcher
        body = infer_body()
        with inference_blocked(service):
            waiting = [connect(port), connect(port)]  # one running (blocked), one queued
            for expected, conn in enumerate(waiting, start=1):
                conn.sendall(infer_head(len(body)) + body)
                wait_until(lambda e=expected: batcher.in_flight == e)
            for path in (INFER, f"/v2/models/{MODEL}/versions/2/infer"):
                with connect(port, timeout=10) as conn:
                    conn.sendall(infer_head(len(body), path) + body[:10])
                    wait_until(lambda c=conn: answered(c), 5, "an answer before the body")
                    response = read_response(conn)
                assert response.status == 503, response.body
                assert "WASTE_MAX_QUEUE_IMAGES" in protocol_error(response)
                assert int(response.headers["retry-after"]) >= 1
        for conn in waiting:
            assert read_response(conn).status == 200
            conn.close()


def test_infer_of_a_client_that_left_is_counted_499(repo: Path) -> None:
    with serving(repo) as (port, service):
        body = infer_body()
        conn = connect(port)
        conn.sendall(infer_head(len(body)) + body[:100])
        wait_until(lambda: service.predictor.upload_memory.in_use > 0, 5, "the body started")
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        metric = f'waste_requests_total{{model="{MODEL}",status="499",version="2"}} 1.0'

        def counted() -> bool:
            with connect(port) as probe:
                probe.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return metric in read_response(probe).body.decode()

        wait_until(counted, 5, "the vanished client counted as 499")
        assert service.predictor.upload_memory.in_use == 0
