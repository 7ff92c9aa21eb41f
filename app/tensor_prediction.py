"""Prediction for requests that bring tensors instead of multipart uploads.

The Open Inference Protocol (app.v2) sends a batch as one tensor: encoded images (BYTES)
or the normalised network input (FP32). From here on they take the path of ``/v1``
predictions (app.prediction): the version's one batcher and its queue bound (slots are
reserved before anything is decoded), the decode pool with the pixel limit and the JPEG
draft setting, the request timeout, and the images metric.

Two differences, both because a tensor answer has no per-element error: an element that
cannot be decoded fails the whole request (naming the element), and the answer is the full
probability matrix ``(N, classes)`` rather than a top-k per file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.batcher import BatcherClosed, QueueFull, Reservation
from app.errors import BadRequest, PayloadTooLarge, ServiceError, Unavailable
from app.images import DecodedImage, ImageRejected, decode_image
from app.inference import InferenceItem, TopK
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.prediction import Batcher, overloaded, unloaded
from app.registry import ServedVersion, VersionEntry


@dataclass(frozen=True)
class EncodedImages:
    """Encoded image files (JPEG, PNG, ...), decoded exactly like uploads."""

    data: Sequence[bytes]
    names: Sequence[str]  # how messages name each element, e.g. "images[2]"


@dataclass(frozen=True)
class NormalisedBatch:
    """The network input itself: float32 ``(N, 3, H, W)``, C-contiguous, finite."""

    tensor: np.ndarray


def image_rejected(rejected: ImageRejected) -> ServiceError:
    """A tensor element that cannot be used: 413 over a limit, else a bad tensor (400)."""
    if rejected.status == 413:
        return PayloadTooLarge(rejected.message, code=rejected.code)
    return BadRequest(rejected.message, code=rejected.code)


class TensorPredictor:
    def __init__(self, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics

    async def probabilities(
        self,
        entry: VersionEntry,
        served: ServedVersion,
        batch: EncodedImages | NormalisedBatch,
    ) -> np.ndarray:
        """Run ``batch`` through the version's batcher: float32 ``(N, classes)``."""
        batcher, classes = served.batcher, served.model.num_classes
        n = len(batch.data) if isinstance(batch, EncodedImages) else batch.tensor.shape[0]
        try:
            reservation = batcher.reserve(n)
        except QueueFull as exc:
            raise overloaded(entry, exc.retry_after_s) from None
        except BatcherClosed:
            raise unloaded(entry) from None
        futures: list[asyncio.Future[TopK]] = []
        decodes: list[asyncio.Future[DecodedImage]] = []
        timeout_s = self._lifecycle.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                with reservation:
                    if isinstance(batch, EncodedImages):
                        decodes = self._decode(served, batch)
                        await self._submit_decoded(
                            entry, decodes, classes, batcher, reservation, futures
                        )
                    else:
                        for row in batch.tensor:
                            futures.append(batcher.submit(InferenceItem(row, classes), reservation))
                rows = [await future for future in futures]
        except BatcherClosed:
            raise unloaded(entry) from None
        except TimeoutError:
            raise Unavailable(
                f"{entry.label} did not answer within {timeout_s:g} s "
                "(WASTE_REQUEST_TIMEOUT_S); the service is overloaded",
                code="timeout",
                retry_after_s=batcher.retry_after_s(),
            ) from None
        finally:
            started: list[asyncio.Future[Any]] = [*futures, *decodes]
            for pending in started:
                _discard(pending)
        self._metrics.images.labels(entry.name, str(entry.version), "predicted").inc(n)
        return _matrix(rows, classes)

    def _decode(
        self, served: ServedVersion, batch: EncodedImages
    ) -> list[asyncio.Future[DecodedImage]]:
        """Start decoding every element in the decode pool (the uploads' settings)."""
        loop = asyncio.get_running_loop()
        settings = self._lifecycle.settings
        prep = served.model.preprocessing
        pool = self._lifecycle.decode_pool
        return [
            loop.run_in_executor(
                pool,
                decode_image,
                data,
                name,
                prep,
                settings.max_image_pixels,
                settings.jpeg_draft,
            )
            for data, name in zip(batch.data, batch.names, strict=True)
        ]

    async def _submit_decoded(
        self,
        entry: VersionEntry,
        decodes: list[asyncio.Future[DecodedImage]],
        classes: int,
        batcher: Batcher,
        reservation: Reservation,
        futures: list[asyncio.Future[TopK]],
    ) -> None:
        """Submit a full batch at a time in element order, so that the forward pass of the
        first images overlaps the decoding of the rest; the first bad element fails all."""
        ready: list[InferenceItem] = []
        for index, decode in enumerate(decodes):
            try:
                decoded = await decode
            except ImageRejected as rejected:
                labels = (entry.name, str(entry.version), "rejected")
                self._metrics.images.labels(*labels).inc()
                raise image_rejected(rejected) from None
            ready.append(InferenceItem(decoded.array, classes))
            if len(ready) == batcher.max_batch_size or index == len(decodes) - 1:
                futures.extend(batcher.submit(item, reservation) for item in ready)
                ready.clear()


def _discard(pending: asyncio.Future[Any]) -> None:
    """Cancel what is still pending; mark a failure nobody awaited as seen (no log noise)."""
    if not pending.done():
        pending.cancel()
    elif not pending.cancelled():
        pending.exception()


def _matrix(rows: list[TopK], classes: int) -> np.ndarray:
    """Per-row (class, probability) pairs covering every class -> float32 (N, classes)."""
    probs = np.zeros((len(rows), classes), dtype=np.float32)
    for row, top in enumerate(rows):
        assert len(top) == classes, "every class was asked for"
        for index, p in top:
            probs[row, index] = p
    return probs
