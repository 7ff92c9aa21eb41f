"""Prediction: per-file answers, the whole-request errors, overload and timeouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from app.service import Service
from tests.app.conftest import MODEL, files, image_bytes, inference_blocked, wait_until
from tests.app.test_api import assert_error

JPEG = image_bytes("JPEG")
MakeClient = Callable[..., TestClient]


def post_in_thread(client: TestClient, n_files: int, out: list[Any]) -> threading.Thread:
    uploads = files(*[(f"{i}.jpg", JPEG) for i in range(n_files)])
    thread = threading.Thread(target=lambda: out.append(client.post("/v1/predict", files=uploads)))
    thread.start()
    return thread


def test_full_queue_is_a_fast_503_with_retry_after_and_accepted_requests_finish(
    make_client: MakeClient,
) -> None:
    client = make_client(
        max_batch_size=2, max_batch_delay_ms=0, max_queue_images=2, max_files_per_request=2
    )
    service: Service = client.app.state.service  # type: ignore[attr-defined]
    registry = service.lifecycle.require_registry()
    batcher = registry.resolve(MODEL, None)[1].batcher
    first: list[Any] = []
    second: list[Any] = []
    with inference_blocked(service):
        a = post_in_thread(client, 2, first)
        wait_until(lambda: batcher.in_flight == 2 and batcher.queue_depth == 0, what="A running")
        b = post_in_thread(client, 2, second)
        wait_until(lambda: batcher.queue_depth == 2, what="B queued")
        started = time.perf_counter()
        refused = client.post("/v1/predict", files=files(("c.jpg", JPEG)))
        elapsed = time.perf_counter() - started
        assert_error(refused, 503, "overloaded", "queue bound", "WASTE_MAX_QUEUE_IMAGES")
        assert int(refused.headers["retry-after"]) >= 1
        assert elapsed < 1.0, elapsed
        assert batcher.queue_depth == 2  # the refused request took nothing
    a.join(30)
    b.join(30)
    assert [r.status_code for r in first + second] == [200, 200]
    assert len(first[0].json()["predictions"]) == 2
    metrics = client.get("/metrics").text
    assert f'waste_requests_total{{model="{MODEL}",status="503",version="2"}} 1.0' in metrics
    assert client.post("/v1/predict", files=files(("d.jpg", JPEG))).status_code == 200


def test_request_timeout_is_a_503_and_the_service_recovers(make_client: MakeClient) -> None:
    client = make_client(request_timeout_s=0.3, max_batch_delay_ms=0)
    service: Service = client.app.state.service  # type: ignore[attr-defined]
    with inference_blocked(service):
        started = time.perf_counter()
        response = client.post("/v1/predict", files=files(("a.jpg", JPEG)))
        elapsed = time.perf_counter() - started
    assert_error(response, 503, "timeout", "0.3 s", "WASTE_REQUEST_TIMEOUT_S")
    assert "retry-after" in response.headers
    assert 0.3 <= elapsed < 5.0
    assert client.post("/v1/predict", files=files(("b.jpg", JPEG))).status_code == 200
