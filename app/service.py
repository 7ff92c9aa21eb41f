"""The service's state and its use cases; routes call these and stay thin.

Start-up (run by the app's lifespan, in the background so liveness answers at once):
demo bootstrap when the repository is empty, then a scan that loads and warms the
versions the registry's loading rule names. Readiness stays 503 until that is done.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starlette.requests import Request

from app.batcher import BatcherClosed, QueueFull
from app.errors import Conflict, ServiceError, Unavailable, Unprocessable
from app.images import ImageRejected, configure_pillow, decode_image
from app.inference import (
    InferenceItem,
    TopK,
    configure_threads,
    resolve_device,
    resolve_dtype,
    usable_cores,
)
from app.metrics import Metrics
from app.registry import ModelRegistry, describe_version, repository_has_models
from app.settings import Settings
from app.uploads import UploadLimits, read_files

log = logging.getLogger("app")


class StartupError(RuntimeError):
    """The service cannot start; the message says what to change."""


def _bootstrap_function(repo: Path) -> Callable[..., Any]:
    """Import the demo bootstrapper lazily: it needs the training extras."""
    try:
        module = importlib.import_module("training.demo")
        bootstrap: Callable[..., Any] = module.bootstrap_demo
        return bootstrap
    except (ImportError, AttributeError) as exc:
        raise StartupError(
            f"the model repository {str(repo)!r} holds no model and WASTE_BOOTSTRAP_DEMO is on, "
            f"but the demo model cannot be built here ({exc}). Install the training extras "
            "(pip install '.[train]'), or publish a model into the repository, or set "
            "WASTE_BOOTSTRAP_DEMO=0."
        ) from exc


def _bootstrap_once(bootstrap: Callable[..., Any], repo: Path, name: str) -> None:
    """Run the demo bootstrap unless another worker process did it meanwhile.

    With WASTE_WORKERS > 1 every worker starts on the same empty repository; a file lock
    makes the first one build the demo and the others wait and then find it.
    """
    import fcntl  # Linux/macOS: where the service runs

    repo.mkdir(parents=True, exist_ok=True)
    with (repo / ".bootstrap.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if repository_has_models(repo):
            log.info("the demo model was published by another worker")
            return
        bootstrap(repo, name=name, log=log.info)


class Service:
    """Everything the routes need: settings, registry, executors, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.precision, self.device)
        self.metrics = Metrics()
        self.metrics.install_state_collector(lambda: self.registry)
        self.registry: ModelRegistry | None = None
        self.limits = UploadLimits(
            max_request_bytes=settings.max_request_bytes,
            max_file_bytes=settings.max_file_bytes,
            max_files=settings.max_files_per_request,
        )
        self.started = False
        self.startup_error: str | None = None
        self.stage = "starting"
        self._decode_pool: ThreadPoolExecutor | None = None
        self._inference_pool: ThreadPoolExecutor | None = None
        self._loader_pool: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Validate the repository, start the executors and the background start-up."""
        settings = self.settings
        repo = settings.model_dir
        if repo.exists() and not repo.is_dir():
            raise StartupError(f"WASTE_MODEL_DIR={str(repo)!r} is not a directory")
        bootstrap: Callable[..., Any] | None = None
        if not repository_has_models(repo):
            if settings.bootstrap_demo:
                bootstrap = _bootstrap_function(repo)
                repo.mkdir(parents=True, exist_ok=True)
            elif not repo.is_dir():
                raise StartupError(
                    f"WASTE_MODEL_DIR={str(repo)!r} does not exist; create it and publish a "
                    "model, or turn on WASTE_BOOTSTRAP_DEMO"
                )
        threads = configure_threads(settings) if self.device.type == "cpu" else None
        configure_pillow(settings.max_image_pixels)
        decode_threads = settings.decode_threads or min(8, usable_cores())
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._inference_pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._loader_pool = ThreadPoolExecutor(1, thread_name_prefix="loader")
        self.registry = ModelRegistry(
            repo,
            settings,
            self.device,
            self.dtype,
            self._inference_pool,
            self._loader_pool,
            on_batch=self.metrics.observe_batch,
        )
        log.info(
            "device %s, %s, torch threads %s, decode threads %d, batch <= %d, delay %.1f ms",
            self.device,
            settings.precision,
            threads if threads is not None else "n/a",
            decode_threads,
            settings.max_batch_size,
            settings.max_batch_delay_ms,
        )
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._startup(bootstrap), name="startup"))
        if settings.poll_interval_s > 0:
            self._tasks.append(loop.create_task(self._poll(), name="poll"))

    async def _startup(self, bootstrap: Callable[..., Any] | None) -> None:
        assert self.registry is not None
        try:
            if bootstrap is not None:
                self.stage = "bootstrapping the demo model (trained on synthetic images)"
                log.warning(
                    "%s is empty: %s; publish a real model for real use",
                    self.settings.model_dir,
                    self.stage,
                )
                await asyncio.get_running_loop().run_in_executor(
                    self._loader_pool,
                    _bootstrap_once,
                    bootstrap,
                    self.settings.model_dir,
                    self.settings.default_model,
                )
            self.stage = "loading models"
            report = await self.registry.scan()
            for failure in report.failed:
                log.error("not loaded: %s", failure)
            if self.settings.default_model not in self.registry.models:
                log.error(
                    "default model %r is not in %s (models: %s)",
                    self.settings.default_model,
                    self.settings.model_dir,
                    ", ".join(sorted(self.registry.models)) or "none",
                )
            self.started = True
            self.stage = "started"
        except Exception as exc:
            self.startup_error = f"{type(exc).__name__}: {exc}"
            self.stage = "start-up failed"
            log.exception("start-up failed")

    async def _poll(self) -> None:
        assert self.registry is not None
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            if not self.started:
                continue
            try:
                report = await self.registry.scan()
            except Exception:
                log.exception("polling the model repository failed")
                continue
            changes = {k: v for k, v in report.as_dict().items() if v}
            if changes:
                log.info("repository changes: %s", changes)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("background task %s failed", task.get_name())
        if self.registry is not None:
            await self.registry.close()
        for pool in (self._decode_pool, self._inference_pool, self._loader_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    @property
    def inference_pool(self) -> ThreadPoolExecutor | None:
        """The single thread every forward pass runs on (None before start)."""
        return self._inference_pool

    def require_registry(self) -> ModelRegistry:
        if self.registry is None:
            raise Unavailable("the service is starting", code="not_ready")
        return self.registry

    # -- readiness ----------------------------------------------------------------------
    def readiness(self, model: str | None = None) -> dict[str, int | None]:
        """Model -> default version when ready; raise 503 with the reasons otherwise."""
        registry = self.require_registry()
        if model is not None:
            registry.model(model)  # 404 for unknown models
        if self.startup_error is not None:
            raise Unavailable(
                f"start-up failed: {self.startup_error}", code="not_ready", retry_after_s=30
            )
        if not self.started:
            raise Unavailable(f"not ready: {self.stage}", code="not_ready", retry_after_s=5)
        names = [model] if model is not None else list(registry.models)
        reasons = registry.readiness(names)
        if model is None and self.settings.default_model not in registry.models:
            reasons.insert(
                0,
                f"the default model {self.settings.default_model!r} is not in the model "
                f"repository (WASTE_DEFAULT_MODEL; models: "
                f"{', '.join(sorted(registry.models)) or 'none'})",
            )
        if reasons:
            raise Unavailable(
                "not ready: " + "; ".join(reasons),
                code="not_ready",
                retry_after_s=5,
                details={"reasons": reasons},
            )
        return {name: registry.default_version(registry.models[name]) for name in names}

    # -- models -------------------------------------------------------------------------
    def model_info(self, name: str) -> dict[str, Any]:
        registry = self.require_registry()
        model = registry.model(name)
        return {
            "name": model.name,
            "default_version": registry.default_version(model),
            "default_selector": model.default_spec,
            "latest_ready": model.latest_ready(),
            "aliases": dict(sorted(model.aliases.items())),
            "aliases_error": model.aliases_error,
            "versions": [describe_version(model, e) for _, e in sorted(model.versions.items())],
        }

    def model_list(self) -> dict[str, Any]:
        registry = self.require_registry()
        names = [n for n, m in sorted(registry.models.items()) if m.versions]
        return {
            "default_model": self.settings.default_model,
            "models": [self.model_info(n) for n in names],
        }

    async def version_detail(self, name: str, spec: str) -> dict[str, Any]:
        registry = self.require_registry()
        model, entry = registry.find_version(name, spec)
        info = describe_version(model, entry)
        info["model"] = name
        try:
            metadata = await registry.metadata(entry)
        except Exception as exc:
            info["metadata"] = None
            info["metadata_error"] = str(exc)
        else:
            info["metadata"] = metadata.model_dump(mode="json")
            info["metadata_error"] = None
        return info

    # -- admin ----------------------------------------------------------------------------
    async def admin_load(self, name: str, version: int) -> dict[str, Any]:
        registry = self.require_registry()
        entry = await registry.load(name, version, pin=True)
        if entry.error is not None:
            raise Unprocessable(
                f"{entry.label} cannot be loaded: {entry.error}",
                code="load_failed",
                details={"model": name, "version": version, "reason": entry.error},
            )
        return describe_version(registry.model(name), entry)

    async def admin_unload(self, name: str, version: int) -> dict[str, Any]:
        registry = self.require_registry()
        entry = await registry.unload(name, version)
        return describe_version(registry.model(name), entry)

    async def admin_set_alias(self, name: str, alias: str, version: int | None) -> dict[str, Any]:
        registry = self.require_registry()
        try:
            await registry.set_alias(name, alias, version)
        except OSError as exc:
            raise Conflict(
                f"cannot write aliases.json of {name!r}: {exc.strerror or exc} (is the model "
                "repository mounted read-only?)",
                code="repository_not_writable",
            ) from None
        return self.model_info(name)

    # -- prediction ---------------------------------------------------------------------
    async def predict(
        self, request: Request, name: str | None, spec: str | None, top_k: int
    ) -> dict[str, Any]:
        """Resolve the version, read and decode the uploads, batch them, answer per file."""
        started = time.perf_counter()
        registry = self.require_registry()
        name = name or self.settings.default_model
        model_label, version_label = "unknown", "none"
        status = 500
        try:
            if name in registry.models:
                model_label = name
            elif not self.started:
                raise Unavailable(f"not ready: {self.stage}", code="not_ready", retry_after_s=5)
            entry, served = registry.resolve(name, spec)
            version_label = str(entry.version)
            result = await self._predict(request, entry.name, entry.version, served, top_k)
            status = 200
            return result
        except ServiceError as exc:
            status = exc.status_code
            raise
        finally:
            self.metrics.requests.labels(model_label, version_label, str(status)).inc()
            if status == 200:
                self.metrics.latency.labels(model_label, version_label).observe(
                    time.perf_counter() - started
                )

    async def _predict(
        self, request: Request, name: str, version: int, served: Any, top_k: int
    ) -> dict[str, Any]:
        model, batcher = served.model, served.batcher
        if top_k > model.num_classes:
            raise Unprocessable(
                f"top_k={top_k} is more than the {model.num_classes} classes of {name} v{version}",
                code="invalid_top_k",
                details={"top_k": top_k, "num_classes": model.num_classes},
            )
        if not batcher.has_room(1):
            # Refuse before reading the body: overload costs us almost nothing.
            raise self._overloaded(name, version, batcher.retry_after_s())
        files = await read_files(request, self.limits)
        try:
            reservation = batcher.reserve(len(files))
        except QueueFull as exc:
            raise self._overloaded(name, version, exc.retry_after_s) from None
        except BatcherClosed:
            raise self._unloaded(name, version) from None
        loop = asyncio.get_running_loop()
        prep, max_pixels = model.preprocessing, self.settings.max_image_pixels
        decodes = [
            loop.run_in_executor(
                self._decode_pool, decode_image, f.data, f.filename, prep, max_pixels
            )
            for f in files
        ]
        outcomes: list[asyncio.Future[TopK] | ImageRejected | None] = []
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                with reservation:
                    # Decoded images join the batcher a full batch at a time (the batch
                    # starts at once, clause 2), so the forward pass of the first images
                    # overlaps the decoding of the rest and no small batch goes first.
                    ready: list[tuple[int, InferenceItem]] = []
                    for index, decode in enumerate(decodes):
                        try:
                            decoded = await decode
                        except ImageRejected as rejected:
                            outcomes.append(rejected)
                        else:
                            outcomes.append(None)  # submitted below
                            ready.append((index, InferenceItem(decoded.tensor, top_k)))
                        if ready and (
                            len(ready) == batcher.max_batch_size or index == len(decodes) - 1
                        ):
                            for position, item in ready:
                                outcomes[position] = batcher.submit(item, reservation)
                            ready.clear()
                pending = [o for o in outcomes if isinstance(o, asyncio.Future)]
                if pending:
                    await asyncio.wait(pending)
        except BatcherClosed:
            self._cancel(outcomes, decodes)
            raise self._unloaded(name, version) from None
        except TimeoutError:
            self._cancel(outcomes, decodes)
            raise Unavailable(
                f"{name} v{version} did not answer within {self.settings.request_timeout_s:g} s "
                "(WASTE_REQUEST_TIMEOUT_S); the service is overloaded",
                code="timeout",
                retry_after_s=batcher.retry_after_s(),
            ) from None
        except BaseException:
            self._cancel(outcomes, decodes)
            raise
        return self._response(name, version, model.class_names, files, outcomes)

    def _response(
        self,
        name: str,
        version: int,
        class_names: list[str],
        files: list[Any],
        outcomes: list[asyncio.Future[TopK] | ImageRejected | None],
    ) -> dict[str, Any]:
        predictions: list[dict[str, Any]] = []
        rejected: list[tuple[str, ImageRejected]] = []
        for upload, outcome in zip(files, outcomes, strict=True):
            if isinstance(outcome, ImageRejected):
                rejected.append((upload.filename, outcome))
                predictions.append(
                    {
                        "status": "error",
                        "filename": upload.filename,
                        "error": {"code": outcome.code, "message": outcome.message},
                    }
                )
                continue
            assert outcome is not None, "every decoded image is submitted"
            exc = outcome.exception()
            if isinstance(exc, BatcherClosed):
                raise self._unloaded(name, version)
            if exc is not None:
                raise exc
            top = outcome.result()
            scores = [{"label": class_names[i], "class_index": i, "confidence": p} for i, p in top]
            predictions.append(
                {
                    "status": "ok",
                    "filename": upload.filename,
                    "label": scores[0]["label"],
                    "class_index": scores[0]["class_index"],
                    "confidence": scores[0]["confidence"],
                    "top_k": scores,
                }
            )
        labels = (name, str(version))
        if rejected:
            self.metrics.images.labels(*labels, "rejected").inc(len(rejected))
        if len(rejected) < len(files):
            self.metrics.images.labels(*labels, "predicted").inc(len(files) - len(rejected))
        if len(rejected) == len(files):
            raise _no_usable_image(rejected)
        return {"model": name, "version": version, "predictions": predictions}

    @staticmethod
    def _cancel(outcomes: list[Any], decodes: list[asyncio.Future[Any]]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, asyncio.Future):
                outcome.cancel()
        for decode in decodes:
            decode.cancel()

    @staticmethod
    def _overloaded(name: str, version: int, retry_after_s: float) -> Unavailable:
        return Unavailable(
            f"{name} v{version} is at its queue bound (WASTE_MAX_QUEUE_IMAGES); retry later",
            code="overloaded",
            retry_after_s=retry_after_s,
        )

    @staticmethod
    def _unloaded(name: str, version: int) -> Unavailable:
        return Unavailable(
            f"{name} v{version} was unloaded while the request waited; retry",
            code="version_unloaded",
            retry_after_s=1,
        )


def _no_usable_image(rejected: list[tuple[str, ImageRejected]]) -> ServiceError:
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


def service_from(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("the service is not initialised", code="not_ready")
    assert isinstance(service, Service)
    return service
