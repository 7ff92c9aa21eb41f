"""Start-up, background polling and shutdown; owns the executors and the model registry.

Start-up (run by the app's lifespan, in the background so liveness answers at once):
demo bootstrap when the repository is empty, then a scan that loads and warms the
versions the registry's loading rule names. Readiness stays 503 until that is done.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from concurrent.futures import ThreadPoolExecutor

from app.bootstrap import Bootstrap, bootstrap_once, check_repository
from app.errors import Unavailable
from app.images import configure_pillow
from app.inference import configure_threads, usable_cores
from app.metrics import Metrics, RequestLabels
from app.registry import ModelRegistry, ServedVersion, VersionEntry
from app.selection import resolve
from app.settings import Settings

log = logging.getLogger("app")


def _freeze_heap() -> None:
    """Move everything start-up built (torch, models, schemas: ~400k objects) out of reach
    of the garbage collector. A full collection otherwise walks all of it, holding the GIL
    for about 200 ms on a small CPU, and under load those pauses were the tail of every
    latency (benchmarks/overload.py). One collection first, so no garbage is kept."""
    gc.collect()
    gc.freeze()


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s'\"/]+/)*([^\s'\"/]+)")


def without_folders(message: str) -> str:
    """``message`` with each absolute path cut to its last component."""
    return _ABSOLUTE_PATH.sub(r"\1", message)


class Lifecycle:
    """The service's running state: executors, registry, and how far start-up got."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # Impossible device/backend/precision combinations stop the service here.
        self.capabilities, self.choices = resolve(settings)
        self.device = self.capabilities.device
        self.registry: ModelRegistry | None = None
        self.started = False
        self.startup_error: str | None = None
        self.stage = "starting"
        self._decode_pool: ThreadPoolExecutor | None = None
        self._inference_pool: ThreadPoolExecutor | None = None
        self._loader_pool: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def decode_pool(self) -> ThreadPoolExecutor | None:
        """The threads that decode and preprocess uploads (None before start)."""
        return self._decode_pool

    @property
    def inference_pool(self) -> ThreadPoolExecutor | None:
        """The single thread every forward pass runs on (None before start)."""
        return self._inference_pool

    def require_registry(self) -> ModelRegistry:
        if self.registry is None:
            raise Unavailable("the service is starting", code="not_ready")
        return self.registry

    def registry_for(self, name: str) -> ModelRegistry:
        """The registry, or 503 while start-up has not yet listed the model ``name``."""
        registry = self.require_registry()
        if name not in registry.models and not self.started:
            raise Unavailable(f"not ready: {self.stage}", code="not_ready", retry_after_s=5)
        return registry

    def resolve(
        self, name: str, spec: str | None, labels: RequestLabels
    ) -> tuple[VersionEntry, ServedVersion]:
        """A request's version by the registry's rule; ``labels`` get what exists of it."""
        registry = self.registry_for(name)
        if name in registry.models:  # never a label a client made up
            labels.model = name
        entry, served = registry.resolve(name, spec)
        labels.version = str(entry.version)
        return entry, served

    async def start(self) -> None:
        """Validate the repository, start the executors and the background start-up."""
        bootstrap = check_repository(self.settings)
        self._start_executors()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._startup(bootstrap), name="startup"))
        if self.settings.poll_interval_s > 0:
            self._tasks.append(loop.create_task(self._poll(), name="poll"))

    def _start_executors(self) -> None:
        settings = self.settings
        threads = configure_threads(settings) if self.device.type == "cpu" else None
        configure_pillow(settings.max_image_pixels)
        decode_threads = settings.decode_threads or min(8, usable_cores())
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._inference_pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._loader_pool = ThreadPoolExecutor(1, thread_name_prefix="loader")
        self.registry = ModelRegistry(
            settings.model_dir,
            settings,
            self.capabilities,
            self.choices,
            self._inference_pool,
            self._loader_pool,
            on_batch=self.metrics.observe_batch,
        )
        log.info(
            "device %s, backends in order of preference: %s; intra-op threads %s, "
            "decode threads %d, batch <= %d, delay %.1f ms",
            self.device,
            ", ".join(map(str, self.choices)),
            threads if threads is not None else "n/a",
            decode_threads,
            settings.max_batch_size,
            settings.max_batch_delay_ms,
        )

    async def _startup(self, bootstrap: Bootstrap | None) -> None:
        registry = self.registry
        assert registry is not None, "start() creates the registry first"
        try:
            if bootstrap is not None:
                await self._bootstrap(bootstrap)
            self.stage = "loading models"
            report = await registry.scan()
            for failure in report.failed:
                log.error("not loaded: %s", failure)
            if self.settings.default_model not in registry.models:
                log.error(
                    "default model %r is not in %s (models: %s)",
                    self.settings.default_model,
                    self.settings.model_dir,
                    ", ".join(sorted(registry.models)) or "none",
                )
            _freeze_heap()
            self.started = True
            self.stage = "started"
        except Exception as exc:
            # Public (readiness answers it): folder names only, the log has the full paths.
            self.startup_error = without_folders(f"{type(exc).__name__}: {exc}")
            self.stage = "start-up failed"
            log.exception("start-up failed")

    async def _bootstrap(self, bootstrap: Bootstrap) -> None:
        self.stage = "bootstrapping the demo model (trained on synthetic images)"
        log.warning(
            "%s is empty: %s; publish a real model for real use",
            self.settings.model_dir,
            self.stage,
        )
        await asyncio.get_running_loop().run_in_executor(
            self._loader_pool,
            bootstrap_once,
            bootstrap,
            self.settings.model_dir,
            self.settings.default_model,
        )

    async def _poll(self) -> None:
        registry = self.registry
        assert registry is not None, "start() creates the registry first"
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            if not self.started:
                continue
            try:
                report = await registry.scan()
            except Exception:
                log.exception("polling the model repository failed")
                continue
            changes = {k: v for k, v in report.as_dict().items() if v}
            if changes:
                log.info("repository changes: %s", changes)

    async def stop(self) -> None:
        gc.unfreeze()  # what start-up froze can be collected again (several apps per process)
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
