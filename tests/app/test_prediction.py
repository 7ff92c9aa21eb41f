"""Prediction: per-file answers, the whole-request errors, overload and timeouts."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.batcher import BatcherClosed
from app.images import ImageRejected
from app.inference import TopK
from app.prediction import Outcome, file_results, no_usable_image
from app.schemas import ClassScore, FileError, ImageFailure, ImagePrediction, PredictResponse
from app.service import Service
from app.uploads import UploadedFile
from tests.app.conftest import (
    MODEL,
    PREPROCESSING,
    files,
    image_bytes,
    inference_blocked,
    wait_until,
)
from tests.app.test_api import assert_error
from wastenet.artifacts import load_version
from wastenet.classes import CLASS_NAMES
from wastenet.preprocess import eval_transform

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


# -- one answer per file (no model needed) ------------------------------------------------
def settled(loop: asyncio.AbstractEventLoop, top: TopK | BaseException) -> asyncio.Future[TopK]:
    future: asyncio.Future[TopK] = loop.create_future()
    if isinstance(top, BaseException):
        future.set_exception(top)
    else:
        future.set_result(top)
    return future


def test_file_results_keep_upload_order_and_name_each_class() -> None:
    loop = asyncio.new_event_loop()
    try:
        uploads = [UploadedFile(n, b"") for n in ("a.jpg", "notes.txt", "c.png")]
        rejected = ImageRejected(415, "unsupported_image_type", "file 'notes.txt' is text")
        outcomes: list[Outcome] = [
            settled(loop, [(5, 0.75), (0, 0.25)]),
            rejected,
            settled(loop, [(11, 0.5)]),
        ]
        results = file_results(uploads, outcomes, CLASS_NAMES)
    finally:
        loop.close()
    assert results == [
        ImagePrediction(
            filename="a.jpg",
            label="green_glass",
            class_index=5,
            confidence=0.75,
            top_k=[
                ClassScore(label="green_glass", class_index=5, confidence=0.75),
                ClassScore(label="battery", class_index=0, confidence=0.25),
            ],
        ),
        ImageFailure(
            filename="notes.txt",
            error=FileError(code="unsupported_image_type", message="file 'notes.txt' is text"),
        ),
        ImagePrediction(
            filename="c.png",
            label="white_glass",
            class_index=11,
            confidence=0.5,
            top_k=[ClassScore(label="white_glass", class_index=11, confidence=0.5)],
        ),
    ]
    body = PredictResponse(
        model=MODEL, version=3, backend="torch", precision="fp32", predictions=results
    ).model_dump(mode="json")
    assert body["predictions"][1] == {
        "status": "error",
        "filename": "notes.txt",
        "error": {"code": "unsupported_image_type", "message": "file 'notes.txt' is text"},
    }


def test_file_results_raise_the_failure_of_a_batch() -> None:
    loop = asyncio.new_event_loop()
    try:
        outcomes: list[Outcome] = [settled(loop, [(1, 1.0)]), settled(loop, BatcherClosed())]
        with pytest.raises(BatcherClosed):
            file_results([UploadedFile("a", b""), UploadedFile("b", b"")], outcomes, CLASS_NAMES)
    finally:
        loop.close()


def test_no_usable_image_is_the_files_own_error_or_the_common_status() -> None:
    text = ImageRejected(415, "unsupported_image_type", "a.txt is text")
    pdf = ImageRejected(415, "unsupported_image_type", "b.pdf is a PDF")
    empty = ImageRejected(422, "empty_file", "c.jpg has 0 bytes")
    only = no_usable_image([("a.txt", text)])
    assert (only.status_code, only.code, only.message, only.details) == (
        415,
        "unsupported_image_type",
        "a.txt is text",
        None,
    )
    same = no_usable_image([("a.txt", text), ("b.pdf", pdf)])
    assert (same.status_code, same.code) == (415, "no_usable_image")
    assert same.message == "none of the 2 files could be used: a.txt is text; b.pdf is a PDF"
    mixed = no_usable_image([("a.txt", text), ("c.jpg", empty)])
    assert (mixed.status_code, mixed.code) == (422, "no_usable_image")
    assert mixed.details == {
        "files": [
            {
                "filename": "a.txt",
                "code": "unsupported_image_type",
                "message": "a.txt is text",
                "status": 415,
            },
            {
                "filename": "c.jpg",
                "code": "empty_file",
                "message": "c.jpg has 0 bytes",
                "status": 422,
            },
        ]
    }


def test_the_jpeg_draft_setting_reaches_decoding(
    make_client: MakeClient, template_repo: Path
) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
    pixels[:200, :300] = (250, 20, 20)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    upload = files(("big.jpg", buffer.getvalue()))
    loaded = load_version(template_repo / MODEL / "2")
    x = eval_transform(PREPROCESSING)(Image.open(io.BytesIO(buffer.getvalue()))).unsqueeze(0)
    with torch.inference_mode():
        exact = loaded.model(x).softmax(dim=1)[0].tolist()

    def served(**settings: Any) -> list[float]:
        client = make_client(**settings)
        body = client.post("/v1/predict", files=upload, params={"top_k": 12}).json()
        top = {t["class_index"]: t["confidence"] for t in body["predictions"][0]["top_k"]}
        return [top[i] for i in range(12)]

    assert served(jpeg_draft=False) == pytest.approx(exact, abs=1e-5)
    reduced = served()  # 800x600 is over twice the resize size (36): decoded at 1/8 scale
    assert reduced != pytest.approx(exact, abs=1e-5)
