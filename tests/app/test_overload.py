"""Refusing under overload stays cheap: before routing, and without GC pauses.

The efficiency itself (goodput at 4x load, CPU per refusal) is measured by
benchmarks/overload.py, not here.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import (
    MODEL,
    OTHER,
    files,
    image_bytes,
    service_of,
    settings_for,
    wait_ready,
)
from tests.app.test_api import assert_error

MakeClient = Callable[..., TestClient]
JPEG = image_bytes("JPEG")


def test_a_full_queue_is_refused_before_routing_and_validation(make_client: MakeClient) -> None:
    client = make_client(max_queue_images=8)
    registry = service_of(client).lifecycle.require_registry()
    batcher = registry.resolve(MODEL, None)[1].batcher
    assert client.portal is not None
    reservation = client.portal.call(batcher.reserve, 8)
    upload = files(("a.jpg", JPEG))
    for path in (
        "/v1/predict?top_k=many",  # an invalid parameter is not even looked at
        f"/v1/models/{MODEL}/predict",
        f"/v1/models/{MODEL}/versions/latest/predict",
        f"/v1/models/{MODEL}/versions/2/predict",
    ):
        response = client.post(path, files=upload)
        assert_error(response, 503, "overloaded", f"{MODEL} v2", "WASTE_MAX_QUEUE_IMAGES")
        assert int(response.headers["retry-after"]) >= 1
    # Other models have their own queues; unknown ones get the route's answer.
    assert client.post(f"/v1/models/{OTHER}/predict", files=upload).status_code == 200
    assert_error(client.post("/v1/models/nope/predict", files=upload), 404, "unknown_model")
    metrics = client.get("/metrics").text
    assert f'waste_requests_total{{model="{MODEL}",status="503",version="2"}} 4.0' in metrics
    client.portal.call(reservation.release)
    assert client.post("/v1/predict", files=upload).status_code == 200


def test_start_up_freezes_its_heap_out_of_the_collectors_reach(repo: Path) -> None:
    with TestClient(create_app(settings_for(repo))) as client:
        wait_ready(client)
        assert gc.get_freeze_count() > 50_000
    assert gc.get_freeze_count() == 0  # stopping gives it back
