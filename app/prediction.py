"""Prediction: resolve the version, read and decode the uploads, batch them, answer per file.

The order keeps overload cheap: a version whose queue is full is refused before the body
is read, and the request reserves room for all its files before any is decoded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request

from app.batcher import BatcherClosed, DynamicBatcher, QueueFull, Reservation
from app.errors import ServiceError, Unavailable, Unprocessable
from app.images import DecodedImage, ImageRejected, decode_image
from app.inference import InferenceItem, TopK
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.registry import ServedVersion, VersionEntry
from app.schemas import (
    ClassScore,
    FileError,
    FileResult,
    ImageFailure,
    ImagePrediction,
    PredictResponse,
)
from app.uploads import UploadedFile, UploadLimits, read_files
from wastenet.schema import Preprocessing

# Per file, in upload order: why it was rejected, or its pending top-k (None only while
# the file waits for its batch).
Outcome = asyncio.Future[TopK] | ImageRejected | None
Batcher = DynamicBatcher[InferenceItem, TopK]


class Predictor:
    def __init__(self, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics
        settings = lifecycle.settings
        self._limits = UploadLimits(
            max_request_bytes=settings.max_request_bytes,
            max_file_bytes=settings.max_file_bytes,
            max_files=settings.max_files_per_request,
        )

    async def predict(
        self, request: Request, name: str | None, spec: str | None, top_k: int
    ) -> PredictResponse:
        """Classify the request's uploads with a model (default: WASTE_DEFAULT_MODEL)."""
        started = time.perf_counter()
        lifecycle = self._lifecycle
        registry = lifecycle.require_registry()
        name = name or lifecycle.settings.default_model
        model_label, version_label = "unknown", "none"
        status = 500
        try:
            if name in registry.models:
                model_label = name
            elif not lifecycle.started:
                raise Unavailable(
                    f"not ready: {lifecycle.stage}", code="not_ready", retry_after_s=5
                )
            entry, served = registry.resolve(name, spec)
            version_label = str(entry.version)
            result = await self._predict(request, entry, served, top_k)
            status = 200
            return result
        except ServiceError as exc:
            status = exc.status_code
            raise
        finally:
            self._metrics.requests.labels(model_label, version_label, str(status)).inc()
            if status == 200:
                self._metrics.latency.labels(model_label, version_label).observe(
                    time.perf_counter() - started
                )

    async def _predict(
        self, request: Request, entry: VersionEntry, served: ServedVersion, top_k: int
    ) -> PredictResponse:
        model, batcher = served.model, served.batcher
        if top_k > model.num_classes:
            raise Unprocessable(
                f"top_k={top_k} is more than the {model.num_classes} classes of {entry.label}",
                code="invalid_top_k",
                details={"top_k": top_k, "num_classes": model.num_classes},
            )
        if not batcher.has_room(1):
            # Refuse before reading the body: overload costs us almost nothing.
            raise overloaded(entry, batcher.retry_after_s())
        files = await read_files(request, self._limits)
        try:
            reservation = batcher.reserve(len(files))
        except QueueFull as exc:
            raise overloaded(entry, exc.retry_after_s) from None
        except BatcherClosed:
            raise unloaded(entry) from None
        outcomes = await self._classify(
            entry, files, model.preprocessing, batcher, reservation, top_k
        )
        try:
            predictions = file_results(files, outcomes, model.class_names)
        except BatcherClosed:
            raise unloaded(entry) from None
        rejected = [
            (upload.filename, outcome)
            for upload, outcome in zip(files, outcomes, strict=True)
            if isinstance(outcome, ImageRejected)
        ]
        self._count_images(entry, len(files), len(rejected))
        if len(rejected) == len(files):
            raise no_usable_image(rejected)
        backend = model.backend
        return PredictResponse(
            model=entry.name,
            version=entry.version,
            backend=backend.name,
            precision=backend.precision,
            predictions=predictions,
        )

    async def _classify(
        self,
        entry: VersionEntry,
        files: list[UploadedFile],
        prep: Preprocessing,
        batcher: Batcher,
        reservation: Reservation,
        top_k: int,
    ) -> list[Outcome]:
        """Decode in worker threads, run through the batcher; every outcome is settled."""
        loop = asyncio.get_running_loop()
        settings = self._lifecycle.settings
        max_pixels, draft = settings.max_image_pixels, settings.jpeg_draft
        pool = self._lifecycle.decode_pool
        decodes = [
            loop.run_in_executor(pool, decode_image, f.data, f.filename, prep, max_pixels, draft)
            for f in files
        ]
        outcomes: list[Outcome] = []
        timeout_s = self._lifecycle.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                with reservation:
                    await _submit_in_batches(decodes, batcher, reservation, top_k, outcomes)
                pending = [o for o in outcomes if isinstance(o, asyncio.Future)]
                if pending:
                    await asyncio.wait(pending)
        except BatcherClosed:
            _cancel(outcomes, decodes)
            raise unloaded(entry) from None
        except TimeoutError:
            _cancel(outcomes, decodes)
            raise Unavailable(
                f"{entry.label} did not answer within {timeout_s:g} s "
                "(WASTE_REQUEST_TIMEOUT_S); the service is overloaded",
                code="timeout",
                retry_after_s=batcher.retry_after_s(),
            ) from None
        except BaseException:
            _cancel(outcomes, decodes)
            raise
        return outcomes

    def _count_images(self, entry: VersionEntry, n_files: int, n_rejected: int) -> None:
        labels = (entry.name, str(entry.version))
        if n_rejected:
            self._metrics.images.labels(*labels, "rejected").inc(n_rejected)
        if n_rejected < n_files:
            self._metrics.images.labels(*labels, "predicted").inc(n_files - n_rejected)


async def _submit_in_batches(
    decodes: list[asyncio.Future[DecodedImage]],
    batcher: Batcher,
    reservation: Reservation,
    top_k: int,
    outcomes: list[Outcome],
) -> None:
    """Append one outcome per decode to ``outcomes``, submitting a full batch at a time.

    A full batch starts at once (the batcher's clause 2), so the forward pass of the first
    images overlaps the decoding of the rest and no small batch goes first.
    """
    ready: list[tuple[int, InferenceItem]] = []
    for index, decode in enumerate(decodes):
        try:
            decoded = await decode
        except ImageRejected as rejected:
            outcomes.append(rejected)
        else:
            outcomes.append(None)  # submitted below
            ready.append((index, InferenceItem(decoded.array, top_k)))
        if ready and (len(ready) == batcher.max_batch_size or index == len(decodes) - 1):
            for position, item in ready:
                outcomes[position] = batcher.submit(item, reservation)
            ready.clear()


def file_results(
    files: Sequence[UploadedFile], outcomes: Sequence[Outcome], class_names: Sequence[str]
) -> list[FileResult]:
    """One entry per file; re-raises a batch's failure (BatcherClosed when unloaded)."""
    results: list[FileResult] = []
    for upload, outcome in zip(files, outcomes, strict=True):
        if isinstance(outcome, ImageRejected):
            error = FileError(code=outcome.code, message=outcome.message)
            results.append(ImageFailure(filename=upload.filename, error=error))
            continue
        assert outcome is not None, "every decoded image is submitted"
        results.append(image_prediction(upload.filename, outcome.result(), class_names))
    return results


def image_prediction(filename: str, top: TopK, class_names: Sequence[str]) -> ImagePrediction:
    scores = [ClassScore(label=class_names[i], class_index=i, confidence=p) for i, p in top]
    best = scores[0]
    return ImagePrediction(
        filename=filename,
        label=best.label,
        class_index=best.class_index,
        confidence=best.confidence,
        top_k=scores,
    )


def no_usable_image(rejected: list[tuple[str, ImageRejected]]) -> ServiceError:
    """The whole request fails: one file -> its own error; several -> the common status."""
    if len(rejected) == 1:
        _, only = rejected[0]
        return ServiceError(only.message, code=only.code, status_code=only.status)
    statuses = {r.status for _, r in rejected}
    status = statuses.pop() if len(statuses) == 1 else 422
    return ServiceError(
        f"none of the {len(rejected)} files could be used: "
        + "; ".join(r.message for _, r in rejected),
        code="no_usable_image",
        status_code=status,
        details={
            "files": [
                {"filename": f, "code": r.code, "message": r.message, "status": r.status}
                for f, r in rejected
            ]
        },
    )


def overloaded(entry: VersionEntry, retry_after_s: float) -> Unavailable:
    return Unavailable(
        f"{entry.label} is at its queue bound (WASTE_MAX_QUEUE_IMAGES); retry later",
        code="overloaded",
        retry_after_s=retry_after_s,
    )


def unloaded(entry: VersionEntry) -> Unavailable:
    return Unavailable(
        f"{entry.label} was unloaded while the request waited; retry",
        code="version_unloaded",
        retry_after_s=1,
    )


def _cancel(outcomes: list[Outcome], decodes: list[asyncio.Future[Any]]) -> None:
    for outcome in outcomes:
        if isinstance(outcome, asyncio.Future):
            outcome.cancel()
    for decode in decodes:
        decode.cancel()
