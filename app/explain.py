"""Explanations: Grad-CAM of a class and CBAM's last spatial attention, per uploaded image.

The computation is the shared one (:func:`wastenet.explain.explain`): one forward and one
backward pass in fp32 torch, whatever backend serves predictions. It stays off the
prediction path:

- Its own executor of ``WASTE_EXPLAIN_CONCURRENCY`` threads (default 1), never the
  batcher's inference thread, so an explanation does not hold up a batch.
- Each of those threads runs torch with ``WASTE_EXPLAIN_THREADS`` intra-op threads
  (default 1), so that on a CPU it takes one core and leaves the rest to predictions,
  and computes at most ``WASTE_EXPLAIN_MAX_BUSY`` (default half) of the time: after an
  explanation of t seconds it rests t * (1/share - 1) before starting the next one. So
  explanations back to back take at most concurrency * share cores (default: half a core)
  from predictions, whatever the load.
- Admission: at most concurrency + ``WASTE_EXPLAIN_QUEUE`` requests are admitted (running
  or waiting); the next one gets 503 ``explain_busy`` with Retry-After at once, before its
  body is read. A slot is given back when its computation ends, not when a timed-out
  client stops waiting, so the bound holds for the work actually running.

The network: a version served by torch with fp32 weights lends its own module (no extra
memory; the shared function's hooks record only the explaining thread's forward). A
version served by ONNX Runtime or in half precision has no fp32 torch module in memory:
its ``weights.safetensors`` is loaded (sha256 checked) on first use and kept for the
``WASTE_EXPLAIN_CACHE_VERSIONS`` most recently explained versions, each costing its
weights' size (ResNet-18-CBAM: about 45 MB).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from starlette.requests import Request
from torch import nn

from app.backends import TorchBackend
from app.errors import PayloadTooLarge, Unavailable, Unprocessable
from app.images import DecodedImage, ImageRejected, decode_image
from app.lifecycle import Lifecycle
from app.metrics import Metrics, counted
from app.prediction import no_usable_image
from app.registry import ServedVersion, VersionEntry
from app.schemas import (
    ClassScore,
    ExplainResponse,
    ExplainResult,
    FileError,
    Heatmap,
    ImageExplanation,
    ImageFailure,
)
from app.uploads import UploadedFile, UploadMemory, hold_body_memory, limits_from, read_files
from wastenet.artifacts import load_version
from wastenet.explain import Explanation, explain, overlay_png
from wastenet.preprocess import normalize
from wastenet.schema import Preprocessing

Decoded = DecodedImage | ImageRejected


class ExplainNetworks:
    """The fp32 torch network that explains each version (see the module docstring)."""

    def __init__(self, device: torch.device, max_versions: int) -> None:
        self.device = device
        self.max_versions = max_versions
        self._lock = threading.Lock()
        # (name, version) -> (the served version it was loaded for, its network)
        self._cache: OrderedDict[tuple[str, int], tuple[weakref.ref[ServedVersion], nn.Module]] = (
            OrderedDict()
        )

    def get(self, entry: VersionEntry, served: ServedVersion) -> nn.Module:
        """The network for this served version (loads it on a miss: call off the loop)."""
        backend = served.model.backend
        if isinstance(backend, TorchBackend):
            module = backend.module
            if next(module.parameters()).dtype == torch.float32:
                return module
        key = (entry.name, entry.version)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0]() is served:
                self._cache.move_to_end(key)
                return cached[1]
        network = load_version(entry.path, self.device).model.requires_grad_(False)
        with self._lock:
            self._cache[key] = (weakref.ref(served), network)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_versions:
                self._cache.popitem(last=False)
        return network

    def cached(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._cache)


@dataclass(frozen=True)
class ExplainJob:
    """One request's decoded images, explained together on an explain thread."""

    entry: VersionEntry
    served: ServedVersion
    arrays: list[np.ndarray]  # uint8 (input_size, input_size, 3) each
    target: int | None
    top_k: int


class Explainer:
    """POST .../explain: resolve the version, read and decode the uploads, explain them."""

    def __init__(self, lifecycle: Lifecycle, metrics: Metrics, memory: UploadMemory) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics
        settings = lifecycle.settings
        self._limits = limits_from(settings)
        self._memory = memory  # shared with predict: one bound on all bodies held
        self.bound = settings.explain_concurrency + settings.explain_queue
        self.admitted = 0  # running or waiting; touched only on the event loop
        self._mean_s = 1.0  # running mean of one computation, for Retry-After
        self._pool: ThreadPoolExecutor | None = None
        self.networks = ExplainNetworks(lifecycle.device, settings.explain_cache_versions)
        self._pace = Pace(settings.explain_max_busy)

    # -- the bound ---------------------------------------------------------------------
    def has_room(self) -> bool:
        return self.admitted < self.bound

    def retry_after_s(self) -> float:
        per_thread = self.admitted / self._lifecycle.settings.explain_concurrency
        return max(1.0, self._mean_s * per_thread)

    def busy(self) -> Unavailable:
        return Unavailable(
            f"explanations are at their bound ({self.bound} requests: "
            "WASTE_EXPLAIN_CONCURRENCY + WASTE_EXPLAIN_QUEUE); retry later",
            code="explain_busy",
            retry_after_s=self.retry_after_s(),
        )

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = start_explain_pool(
                self._lifecycle.settings.explain_concurrency,
                self._lifecycle.settings.explain_threads,
            )
        return self._pool

    async def _run(self, job: ExplainJob) -> list[ImageExplanation]:
        """Run on the explain pool; the slot returns when the computation ends."""
        if not self.has_room():
            raise self.busy()
        loop = asyncio.get_running_loop()
        self.admitted += 1
        started = time.perf_counter()

        def release(_: Future[list[ImageExplanation]]) -> None:
            seconds = time.perf_counter() - started
            loop.call_soon_threadsafe(self._release, seconds)

        future = self._executor().submit(self._compute, job)
        future.add_done_callback(release)
        return await asyncio.wrap_future(future)

    def _release(self, seconds: float) -> None:
        self.admitted -= 1
        self._mean_s = 0.8 * self._mean_s + 0.2 * seconds

    # -- the request ---------------------------------------------------------------------
    async def explain(
        self,
        request: Request,
        name: str | None,
        spec: str | None,
        top_k: int,
        target: str | None,
    ) -> ExplainResponse:
        """Explain the request's uploads with a version chosen as predict chooses it."""
        lifecycle = self._lifecycle
        name = name or lifecycle.settings.default_model
        with counted(self._metrics.explain_requests, self._metrics.explain_latency) as labels:
            entry, served = lifecycle.resolve(name, spec, labels)
            return await self._explain(request, entry, served, top_k, target)

    async def _explain(
        self,
        request: Request,
        entry: VersionEntry,
        served: ServedVersion,
        top_k: int,
        target: str | None,
    ) -> ExplainResponse:
        class_names = served.model.class_names
        check_top_k(top_k, len(class_names), entry)
        target_index = class_index(target, class_names, entry)
        if not self.has_room():
            raise self.busy()  # before the body is read: refusing costs almost nothing
        with hold_body_memory(request, self._limits, self._memory) as memory:
            files = await read_files(request, self._limits, memory=memory)
            check_file_count(len(files), self._lifecycle.settings.explain_max_files)
            decoded = await self._decode(files, served.model.preprocessing)
        rejected = [
            (f.filename, d)
            for f, d in zip(files, decoded, strict=True)
            if isinstance(d, ImageRejected)
        ]
        if len(rejected) == len(files):
            raise no_usable_image(rejected)
        arrays = [d.array for d in decoded if isinstance(d, DecodedImage)]
        job = ExplainJob(entry, served, arrays, target_index, top_k)
        timeout_s = self._lifecycle.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                explained = await self._run(job)
        except TimeoutError:
            raise Unavailable(
                f"explaining with {entry.label} took over {timeout_s:g} s "
                "(WASTE_REQUEST_TIMEOUT_S)",
                code="timeout",
                retry_after_s=self.retry_after_s(),
            ) from None
        return ExplainResponse(
            model=entry.name,
            version=entry.version,
            backend="torch",
            precision="fp32",
            explanations=merge(files, decoded, explained),
        )

    async def _decode(self, files: list[UploadedFile], prep: Preprocessing) -> list[Decoded]:
        loop = asyncio.get_running_loop()
        settings = self._lifecycle.settings
        pool = self._lifecycle.decode_pool
        tasks = [
            loop.run_in_executor(
                pool,
                decode_image,
                f.data,
                f.filename,
                prep,
                settings.max_image_pixels,
                settings.jpeg_draft,
            )
            for f in files
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ImageRejected):
                raise result
        return [r for r in results if isinstance(r, DecodedImage | ImageRejected)]

    # -- on an explain thread --------------------------------------------------------------
    def _compute(self, job: ExplainJob) -> list[ImageExplanation]:
        with self._pace:
            return self._explain_job(job)

    def _explain_job(self, job: ExplainJob) -> list[ImageExplanation]:
        network = self.networks.get(job.entry, job.served)
        model = job.served.model
        batch = torch.from_numpy(np.stack(job.arrays)).permute(0, 3, 1, 2)
        explained = explain(network, normalize(batch, model.preprocessing), job.target)
        return [
            image_explanation(array, found, model.class_names, job.top_k)
            for array, found in zip(job.arrays, explained, strict=True)
        ]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class Pace:
    """Keeps each thread busy at most ``share`` of the time: entering waits out the rest
    that the thread's previous computation earned (per thread, so threads do not queue
    behind each other's rests)."""

    def __init__(self, share: float) -> None:
        assert 0.0 < share <= 1.0, "validated by Settings"
        self.share = share
        self._local = threading.local()

    def __enter__(self) -> None:
        wait = getattr(self._local, "ready_at", 0.0) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._local.started = time.monotonic()

    def __exit__(self, *_: object) -> None:
        now = time.monotonic()
        busy = now - self._local.started
        self._local.ready_at = now + busy * (1.0 / self.share - 1.0)


def start_explain_pool(concurrency: int, threads: int) -> ThreadPoolExecutor:
    """The explain threads, each with ``threads`` torch intra-op threads (0: unchanged).

    torch.set_num_threads applies to the calling thread, and also becomes the default that
    threads take on their first torch call (a per-thread lazy initialisation, which would
    also overwrite a count set before it). So every explain thread initialises, then sets
    its count, now (a barrier holds them until all exist); the caller then sets its own
    count again, which restores the default that later decode or inference threads take.
    """
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="explain")
    if threads == 0:
        return pool
    own = torch.get_num_threads()
    barrier = threading.Barrier(concurrency)

    def limit() -> None:
        torch.get_num_threads()  # the lazy initialisation first, so it cannot undo the next
        torch.set_num_threads(threads)
        barrier.wait(timeout=30)

    for future in [pool.submit(limit) for _ in range(concurrency)]:
        future.result()
    torch.set_num_threads(own)
    return pool


def check_top_k(top_k: int, num_classes: int, entry: VersionEntry) -> None:
    if top_k > num_classes:
        raise Unprocessable(
            f"top_k={top_k} is more than the {num_classes} classes of {entry.label}",
            code="invalid_top_k",
            details={"top_k": top_k, "num_classes": num_classes},
        )


def class_index(target: str | None, class_names: Sequence[str], entry: VersionEntry) -> int | None:
    if target is None:
        return None
    if target not in class_names:
        raise Unprocessable(
            f"target {target!r} is not a class of {entry.label} "
            f"(classes: {', '.join(class_names)})",
            code="unknown_class",
            details={"target": target, "classes": list(class_names)},
        )
    return list(class_names).index(target)


def check_file_count(n_files: int, limit: int) -> None:
    if n_files > limit:
        err = PayloadTooLarge(
            f"{n_files} files is more than the {limit} an explanation request may hold "
            "(WASTE_EXPLAIN_MAX_FILES)",
            code="too_many_files",
            details={"limit": limit, "setting": "WASTE_EXPLAIN_MAX_FILES"},
        )
        raise err


def heatmap(array: np.ndarray, values: np.ndarray) -> Heatmap:
    image = Image.fromarray(array, "RGB")
    png = overlay_png(image, values)
    return Heatmap(
        height=int(values.shape[0]),
        width=int(values.shape[1]),
        values=np.round(values.astype(np.float64), 6).tolist(),
        overlay_png=base64.b64encode(png).decode("ascii"),
    )


def image_explanation(
    array: np.ndarray, found: Explanation, class_names: Sequence[str], top_k: int
) -> ImageExplanation:
    """One image's answer; ``filename`` is filled in by :func:`merge`."""
    probs = found.probabilities
    assert probs is not None, "wastenet.explain returns the probabilities"
    order = np.argsort(-probs, kind="stable")[:top_k]
    scores = [
        ClassScore(label=class_names[i], class_index=int(i), confidence=float(probs[i]))
        for i in order
    ]
    best = scores[0]
    target = ClassScore(
        label=class_names[found.class_index],
        class_index=found.class_index,
        confidence=found.probability,
    )
    attention = None if found.attention is None else heatmap(array, found.attention)
    return ImageExplanation(
        filename="",
        label=best.label,
        class_index=best.class_index,
        confidence=best.confidence,
        top_k=scores,
        target=target,
        grad_cam=heatmap(array, found.cam),
        attention=attention,
        input_size=int(array.shape[0]),
    )


def merge(
    files: Sequence[UploadedFile],
    decoded: Sequence[Decoded],
    explained: Sequence[ImageExplanation],
) -> list[ExplainResult]:
    """One entry per file in upload order: its explanation or why it was rejected."""
    results: list[ExplainResult] = []
    done = iter(explained)
    for upload, item in zip(files, decoded, strict=True):
        if isinstance(item, ImageRejected):
            error = FileError(code=item.code, message=item.message)
            results.append(ImageFailure(filename=upload.filename, error=error))
            continue
        result = next(done)
        results.append(result.model_copy(update={"filename": upload.filename}))
    return results
