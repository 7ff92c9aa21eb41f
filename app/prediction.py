"""Prediction: resolve the version, read and decode the uploads, batch them, answer per file.

The order keeps overload cheap: a request holds one queue slot and memory for its
declared body *before* reading any of it (refused at once with 503 otherwise), and one
more slot as each further file part begins, so a request that ends as 503 never uploads
in full first. Files' bytes are given back as soon as they are decoded. A client that
disconnects while its images wait has them withdrawn from the queue (never run).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import Gauge
from starlette.requests import Request

from app.batcher import BatcherClosed, DynamicBatcher, QueueFull, Reservation
from app.errors import ServiceError, Unavailable, Unprocessable
from app.images import DecodedImage, ImageRejected, decode_image
from app.inference import InferenceItem, TopK
from app.lifecycle import Lifecycle
from app.metrics import Metrics, counted
from app.registry import ServedVersion, VersionEntry
from app.schemas import (
    UNCERTAIN,
    ClassScore,
    FileError,
    FileResult,
    ImageFailure,
    ImagePrediction,
    PredictResponse,
)
from app.uploads import (
    ClientGone,
    MemoryHold,
    UploadedFile,
    UploadMemory,
    hold_body_memory,
    limits_from,
    read_files,
)
from wastenet.schema import Preprocessing

# Per file, in upload order: why it was rejected, or its pending top-k (None only while
# the file waits for its batch).
Outcome = asyncio.Future[TopK] | ImageRejected | None
T = TypeVar("T")
# The prediction routes (app.routes): /v1/predict, /v1/models/{name}/predict and
# /v1/models/{name}/versions/{version}/predict.
_PREDICT_PATHS = (
    re.compile(r"/v1(?:/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?)?/predict"),
    re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer"),
)
Batcher = DynamicBatcher[InferenceItem, TopK]


class Predictor:
    def __init__(self, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics
        settings = lifecycle.settings
        self._limits = limits_from(settings)
        self.upload_memory = UploadMemory(settings.max_upload_memory_bytes)
        Gauge(
            "waste_upload_memory_bytes",
            "Bytes of request bodies held in memory now (bound: WASTE_MAX_UPLOAD_MEMORY_BYTES).",
            registry=metrics.registry,
        ).set_function(lambda: self.upload_memory.in_use)

    async def predict(
        self,
        request: Request,
        name: str | None,
        spec: str | None,
        top_k: int,
        min_confidence: float | None = None,
    ) -> PredictResponse:
        """Classify the request's uploads with a model (default: WASTE_DEFAULT_MODEL).

        Images whose top probability is below ``min_confidence`` (default:
        WASTE_MIN_CONFIDENCE) are answered 'uncertain'.
        """
        settings = self._lifecycle.settings
        if min_confidence is None:
            min_confidence = settings.min_confidence
        with counted(self._metrics.requests, self._metrics.latency) as labels:
            entry, served = self._lifecycle.resolve(name or settings.default_model, spec, labels)
            return await self._predict(request, entry, served, top_k, min_confidence)

    def shed(self, path: str) -> Unavailable | None:
        """The 503 for a prediction whose version's queue is full, decided from the path.

        Runs before routing (app.middleware.ShedOverload), so a refusal costs almost
        nothing. None means "let the route decide", also for every other error.
        """
        match = next(filter(None, (p.fullmatch(path) for p in _PREDICT_PATHS)), None)
        registry = self._lifecycle.registry
        if match is None or registry is None:
            return None
        name = match["name"] or self._lifecycle.settings.default_model
        try:
            entry, served = registry.resolve(name, match["version"])
        except ServiceError:
            return None
        batcher = served.batcher
        if batcher.has_room(1):
            return None
        self._metrics.requests.labels(entry.name, str(entry.version), "503").inc()
        return overloaded(entry, batcher.retry_after_s())

    async def _predict(
        self,
        request: Request,
        entry: VersionEntry,
        served: ServedVersion,
        top_k: int,
        min_confidence: float,
    ) -> PredictResponse:
        model, batcher = served.model, served.batcher
        if top_k > model.num_classes:
            raise Unprocessable(
                f"top_k={top_k} is more than the {model.num_classes} classes of {entry.label}",
                code="invalid_top_k",
                details={"top_k": top_k, "num_classes": model.num_classes},
            )
        # Before reading the body: a queue slot, then memory for the declared body.
        reservation = _slots(entry, batcher.reserve, 1)

        def admit_file(count: int) -> None:
            if count > 1:  # the first file has the slot held above
                _slots(entry, reservation.grow, 1)

        with reservation, hold_body_memory(request, self._limits, self.upload_memory) as memory:
            files = await read_files(request, self._limits, memory=memory, on_file=admit_file)
            work = _Work(files, batcher, reservation, memory, top_k)
            outcomes = await self._classify(request, entry, work, model.preprocessing)
        try:
            predictions = file_results(files, outcomes, model.class_names, min_confidence)
        except BatcherClosed:
            raise unloaded(entry) from None
        rejected = [
            (upload.filename, outcome)
            for upload, outcome in zip(files, outcomes, strict=True)
            if isinstance(outcome, ImageRejected)
        ]
        self._count_images(entry, len(files), len(rejected))
        self._count_uncertain(entry, predictions)
        if len(rejected) == len(files):
            raise no_usable_image(rejected)
        backend = model.backend
        return PredictResponse(
            model=entry.name,
            version=entry.version,
            backend=backend.name,
            precision=backend.precision,
            predictions=predictions,
            min_confidence=min_confidence,
        )

    async def _classify(
        self, request: Request, entry: VersionEntry, work: _Work, prep: Preprocessing
    ) -> list[Outcome]:
        """Decode in worker threads, run through the batcher; every outcome is settled.

        Waits for the images, for the client to disconnect (its images are then withdrawn
        from the queue: the batcher never processes a cancelled item) or for the request
        timeout, whichever comes first.
        """
        loop = asyncio.get_running_loop()
        settings = self._lifecycle.settings
        max_pixels, draft = settings.max_image_pixels, settings.jpeg_draft
        pool = self._lifecycle.decode_pool
        work.decodes = [
            loop.run_in_executor(pool, decode_image, f.data, f.filename, prep, max_pixels, draft)
            for f in work.files
        ]
        timeout_s = settings.request_timeout_s
        settling = loop.create_task(work.settle())
        gone = loop.create_task(_client_gone(request))
        try:
            done, _ = await asyncio.wait(
                (settling, gone), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:  # also when this request is cancelled (server shutdown)
            gone.cancel()
            if not settling.done():
                settling.cancel()
                work.cancel()
        if settling in done:
            try:
                settling.result()
            except BatcherClosed:
                work.cancel()
                raise unloaded(entry) from None
            except BaseException:
                work.cancel()
                raise
            return work.outcomes
        if gone in done:
            raise ClientGone(f"the client disconnected while {entry.label} was busy")
        raise Unavailable(
            f"{entry.label} did not answer within {timeout_s:g} s "
            "(WASTE_REQUEST_TIMEOUT_S); the service is overloaded",
            code="timeout",
            retry_after_s=work.batcher.retry_after_s(),
        )

    def _count_uncertain(self, entry: VersionEntry, predictions: list[FileResult]) -> None:
        uncertain = sum(isinstance(p, ImagePrediction) and p.uncertain for p in predictions)
        if uncertain:
            self._metrics.uncertain.labels(entry.name, str(entry.version)).inc(uncertain)

    def _count_images(self, entry: VersionEntry, n_files: int, n_rejected: int) -> None:
        labels = (entry.name, str(entry.version))
        if n_rejected:
            self._metrics.images.labels(*labels, "rejected").inc(n_rejected)
        if n_rejected < n_files:
            self._metrics.images.labels(*labels, "predicted").inc(n_files - n_rejected)


class _Work:
    """One request's images on their way through decoding and the batcher."""

    def __init__(
        self,
        files: list[UploadedFile],
        batcher: Batcher,
        reservation: Reservation,
        memory: MemoryHold,
        top_k: int,
    ) -> None:
        self.files = files
        self.batcher = batcher
        self.reservation = reservation
        self.memory = memory
        self.top_k = top_k
        self.decodes: list[asyncio.Future[DecodedImage]] = []
        self.outcomes: list[Outcome] = []

    async def settle(self) -> None:
        with self.reservation:
            await _submit_in_batches(
                self.decodes, self.batcher, self.reservation, self.top_k, self.outcomes
            )
        # Every file is decoded: its bytes are no longer needed by anyone.
        self.memory.release()
        for upload in self.files:
            upload.data = b""
        pending = [o for o in self.outcomes if isinstance(o, asyncio.Future)]
        if pending:
            await asyncio.wait(pending)

    def cancel(self) -> None:
        _cancel(self.outcomes, self.decodes)


def _slots(entry: VersionEntry, hold: Callable[[int], T], n: int) -> T:
    """``batcher.reserve`` or ``reservation.grow``, with the errors as HTTP answers."""
    try:
        return hold(n)
    except QueueFull as exc:
        raise overloaded(entry, exc.retry_after_s) from None
    except BatcherClosed:
        raise unloaded(entry) from None


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    files: Sequence[UploadedFile],
    outcomes: Sequence[Outcome],
    class_names: Sequence[str],
    min_confidence: float = 0.0,
) -> list[FileResult]:
    """One entry per file; re-raises a batch's failure (BatcherClosed when unloaded)."""
    results: list[FileResult] = []
    for upload, outcome in zip(files, outcomes, strict=True):
        if isinstance(outcome, ImageRejected):
            error = FileError(code=outcome.code, message=outcome.message)
            results.append(ImageFailure(filename=upload.filename, error=error))
            continue
        assert outcome is not None, "every decoded image is submitted"
        results.append(
            image_prediction(upload.filename, outcome.result(), class_names, min_confidence)
        )
    return results


def image_prediction(
    filename: str, top: TopK, class_names: Sequence[str], min_confidence: float = 0.0
) -> ImagePrediction:
    """The answer for one image; 'uncertain' (no class) when its top probability is below
    ``min_confidence``, with the top-k still listed for whoever sorts it by hand."""
    scores = [ClassScore(label=class_names[i], class_index=i, confidence=p) for i, p in top]
    best = scores[0]
    uncertain = best.confidence < min_confidence
    return ImagePrediction(
        filename=filename,
        label=UNCERTAIN if uncertain else best.label,
        class_index=None if uncertain else best.class_index,
        confidence=best.confidence,
        uncertain=uncertain,
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
