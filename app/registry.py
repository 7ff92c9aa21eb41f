"""The model repository as the service sees it: versions, their states, aliases, defaults.

Which versions are loaded (the rule ``scan`` applies at start, on every rescan and poll):

- for each model, its **latest**: the highest version that loads (a version that fails is
  reported as ``failed`` with its reason and the next lower one is tried);
- every version an **alias** points to (``aliases.json``);
- versions an admin loaded explicitly (*pinned*) stay loaded until an admin unloads them.

When a newer version becomes ready, the previous latest is unloaded unless an alias or an
admin pins it; requests already queued on it still get their answers. Failed versions are
not retried by a scan unless asked (``retry_failed``) or loaded explicitly by an admin.

Version selection (DESIGN.md): an integer, ``latest`` (the highest *ready* version) or an
alias; none means the model's default: alias ``production`` when present, else ``latest``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.backends import BackendUnavailable, open_backend
from app.batcher import BatchStats, DynamicBatcher
from app.errors import NotFound, Unavailable
from app.inference import InferenceItem, InferenceModel, TopK, usable_cores, warmup_batch_sizes
from app.schemas import ScanResult, VersionInfo
from app.selection import Capabilities, Choice
from app.settings import Settings
from wastenet.artifacts import (
    ArtifactError,
    LoadedVersion,
    list_models,
    list_versions,
    load_version,
    read_aliases,
    read_metadata,
    write_aliases,
)
from wastenet.schema import ModelMetadata

log = logging.getLogger("app.registry")

DEFAULT_ALIAS = "production"
MAX_REASON_CHARS = 400
LATEST = "latest"


class VersionState(enum.StrEnum):
    AVAILABLE = "available"  # on disk, not loaded
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(eq=False)
class ServedVersion:
    """A ready version: the prepared network and its batcher."""

    model: InferenceModel
    batcher: DynamicBatcher[InferenceItem, TopK]
    loaded_at: datetime


@dataclass(eq=False)
class VersionEntry:
    name: str
    version: int
    path: Path
    state: VersionState = VersionState.AVAILABLE
    error: str | None = None
    pinned: bool = False
    served: ServedVersion | None = None
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


@dataclass(eq=False)
class ModelEntry:
    name: str
    path: Path
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    aliases_error: str | None = None

    @property
    def default_spec(self) -> str:
        return DEFAULT_ALIAS if DEFAULT_ALIAS in self.aliases else LATEST

    def ready_versions(self) -> list[int]:
        return sorted(v for v, e in self.versions.items() if e.state is VersionState.READY)

    def latest_ready(self) -> int | None:
        ready = self.ready_versions()
        return ready[-1] if ready else None

    def aliases_of(self, version: int) -> list[str]:
        return sorted(a for a, v in self.aliases.items() if v == version)


@dataclass
class ScanReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": self.added,
            "removed": self.removed,
            "loaded": self.loaded,
            "failed": self.failed,
            "unloaded": self.unloaded,
        }

    def as_result(self) -> ScanResult:
        return ScanResult(**self.as_dict())


BatchObserver = Callable[[VersionEntry, BatchStats], None]


class ModelRegistry:
    """Tracks ``models/`` and owns every loaded version's network and batcher."""

    def __init__(
        self,
        repo: Path,
        settings: Settings,
        capabilities: Capabilities,
        choices: list[Choice],
        inference_executor: Executor,
        loader_executor: Executor,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.repo = repo
        self.settings = settings
        self.capabilities = capabilities
        self.choices = choices
        self._inference_executor = inference_executor
        self._loader_executor = loader_executor
        self._on_batch = on_batch
        self.models: dict[str, ModelEntry] = {}
        self._scan_lock = asyncio.Lock()
        self._closed = False

    # -- lookup -------------------------------------------------------------------------
    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None or not entry.versions:
            known = ", ".join(n for n, m in sorted(self.models.items()) if m.versions) or "none"
            raise NotFound(
                f"model {name!r} not found (models: {known})",
                code="unknown_model",
                details={"model": name},
            )
        return entry

    def find_version(self, name: str, spec: str | None) -> tuple[ModelEntry, VersionEntry]:
        """Resolve ``spec`` (int, 'latest', alias or None) to an entry in any state."""
        model = self.model(name)
        spec = model.default_spec if spec is None else spec
        if spec == LATEST:
            latest = model.latest_ready()
            if latest is None:
                raise Unavailable(
                    f"model {name!r} has no ready version yet: {self._states_text(model)}",
                    code="no_ready_version",
                    retry_after_s=5,
                    details={"model": name, "versions": self._states(model)},
                )
            return model, model.versions[latest]
        if spec.isdigit() and not spec.startswith("0"):
            number = int(spec)
            if number not in model.versions:
                raise NotFound(
                    f"version {number} of model {name!r} not found (versions: "
                    f"{', '.join(map(str, sorted(model.versions)))})",
                    code="unknown_version",
                    details={"model": name, "version": spec},
                )
            return model, model.versions[number]
        if spec in model.aliases:
            target = model.aliases[spec]
            if target not in model.versions:
                raise Unavailable(
                    f"alias {spec!r} of model {name!r} points to version {target}, which is "
                    "not in the model repository",
                    code="alias_target_missing",
                    retry_after_s=30,
                    details={"model": name, "alias": spec, "version": target},
                )
            return model, model.versions[target]
        aliases = ", ".join(sorted(model.aliases)) or "none"
        raise NotFound(
            f"version {spec!r} of model {name!r} not found: use a version number, 'latest' "
            f"or an alias (aliases: {aliases})",
            code="unknown_version",
            details={"model": name, "version": spec},
        )

    def resolve(self, name: str, spec: str | None) -> tuple[VersionEntry, ServedVersion]:
        """Resolve to a version that can serve now, or raise 404/503 with the reason."""
        _, entry = self.find_version(name, spec)
        served = entry.served
        if entry.state is VersionState.READY and served is not None:
            return entry, served
        if entry.state is VersionState.LOADING:
            raise Unavailable(
                f"{entry.label} is still loading",
                code="version_loading",
                retry_after_s=5,
                details={"model": entry.name, "version": entry.version},
            )
        if entry.state is VersionState.FAILED:
            raise Unavailable(
                f"{entry.label} failed to load: {entry.error}",
                code="version_failed",
                retry_after_s=60,
                details={"model": entry.name, "version": entry.version, "reason": entry.error},
            )
        raise Unavailable(
            f"{entry.label} is not loaded; an admin can load it with POST "
            f"/v1/admin/models/{entry.name}/versions/{entry.version}/load",
            code="version_not_loaded",
            retry_after_s=60,
            details={"model": entry.name, "version": entry.version},
        )

    def default_version(self, model: ModelEntry) -> int | None:
        if model.default_spec == LATEST:
            return model.latest_ready()
        return model.aliases[DEFAULT_ALIAS]

    def readiness(self, names: Iterable[str] | None = None) -> list[str]:
        """Reasons the models' default versions cannot serve ([] = ready)."""
        reasons = []
        selected = [n for n in (names or self.models) if n in self.models]
        for name in sorted(selected):
            model = self.models[name]
            if not model.versions:
                continue
            try:
                self.resolve(name, None)
            except (NotFound, Unavailable) as exc:
                reasons.append(exc.message)
        return reasons

    @staticmethod
    def _states(model: ModelEntry) -> dict[str, str]:
        return {str(v): e.state.value for v, e in sorted(model.versions.items())}

    @staticmethod
    def _states_text(model: ModelEntry) -> str:
        parts = []
        for v, e in sorted(model.versions.items()):
            parts.append(f"v{v} {e.state.value}" + (f" ({e.error})" if e.error else ""))
        return "; ".join(parts)

    # -- scanning -----------------------------------------------------------------------
    async def scan(self, retry_failed: bool = False) -> ScanReport:
        """Sync with the repository on disk and load what the loading rule asks for."""
        async with self._scan_lock:
            report = ScanReport()
            listing = await asyncio.get_running_loop().run_in_executor(
                self._loader_executor, _list_repository, self.repo
            )
            for name in sorted(set(self.models) - set(listing)):
                for version in sorted(self.models[name].versions):
                    await self._forget(self.models[name], version, report)
                del self.models[name]
            for name, (versions, aliases, aliases_error) in sorted(listing.items()):
                model = self.models.setdefault(name, ModelEntry(name, self.repo / name))
                model.aliases, model.aliases_error = aliases, aliases_error
                if aliases_error:
                    log.error("%s: %s", name, aliases_error)
                for version in sorted(set(model.versions) - set(versions)):
                    await self._forget(model, version, report)
                for version in versions:
                    if version not in model.versions:
                        model.versions[version] = VersionEntry(
                            name, version, model.path / str(version)
                        )
                        report.added.append(f"{name} v{version}")
                if retry_failed:
                    for entry in model.versions.values():
                        if entry.state is VersionState.FAILED:
                            entry.state, entry.error = VersionState.AVAILABLE, None
            # Every model and version is known (and listed as loading/available) before the
            # first load, so a request meanwhile gets 503 "loading", not 404.
            for name in sorted(listing):
                await self._apply_loading_rule(self.models[name], report)
            return report

    async def _apply_loading_rule(self, model: ModelEntry, report: ScanReport) -> None:
        for version in sorted(model.versions, reverse=True):
            entry = model.versions[version]
            if entry.state in (VersionState.READY, VersionState.LOADING):
                break
            if entry.state is VersionState.FAILED:
                continue
            await self._load_entry(entry, report)
            if entry.state is VersionState.READY:
                break
        for version in sorted(set(model.aliases.values())):
            aliased = model.versions.get(version)
            if aliased is not None and aliased.state is VersionState.AVAILABLE:
                await self._load_entry(aliased, report)
        keep = set(model.aliases.values())
        latest = model.latest_ready()
        if latest is not None:
            keep.add(latest)
        for version, entry in sorted(model.versions.items()):
            if entry.state is VersionState.READY and not entry.pinned and version not in keep:
                await self._unload_entry(entry)
                report.unloaded.append(entry.label)

    async def _forget(self, model: ModelEntry, version: int, report: ScanReport) -> None:
        entry = model.versions.pop(version)
        if entry.load_task is not None and not entry.load_task.done():
            await asyncio.shield(entry.load_task)
        await self._unload_entry(entry)
        report.removed.append(entry.label)

    # -- loading ------------------------------------------------------------------------
    async def load(self, name: str, version: int, pin: bool = True) -> VersionEntry:
        """Load one version (admin); failures are recorded on the entry, not raised."""
        model = self.model(name)
        entry = model.versions.get(version)
        if entry is None:
            # It may have been published since the last scan.
            await self.scan()
            model = self.model(name)
            entry = model.versions.get(version)
        if entry is None:
            raise NotFound(
                f"version {version} of model {name!r} not found (versions: "
                f"{', '.join(map(str, sorted(model.versions)))})",
                code="unknown_version",
                details={"model": name, "version": str(version)},
            )
        if entry.state is VersionState.FAILED:
            entry.state, entry.error = VersionState.AVAILABLE, None  # an explicit retry
        if entry.state is not VersionState.READY:
            await self._load_entry(entry, ScanReport())
        if entry.state is VersionState.READY and pin:
            entry.pinned = True
        return entry

    async def unload(self, name: str, version: int) -> VersionEntry:
        model = self.model(name)
        entry = model.versions.get(version)
        if entry is None:
            raise NotFound(
                f"version {version} of model {name!r} not found",
                code="unknown_version",
                details={"model": name, "version": str(version)},
            )
        if entry.load_task is not None and not entry.load_task.done():
            await asyncio.shield(entry.load_task)
        entry.pinned = False
        await self._unload_entry(entry)
        return entry

    async def _load_entry(self, entry: VersionEntry, report: ScanReport) -> None:
        if entry.load_task is None or entry.load_task.done():
            entry.state, entry.error = VersionState.LOADING, None
            entry.load_task = asyncio.get_running_loop().create_task(self._load(entry))
        await asyncio.shield(entry.load_task)
        if entry.state is VersionState.READY:
            report.loaded.append(entry.label)
        elif entry.state is VersionState.FAILED:
            report.failed.append(f"{entry.label}: {entry.error}")

    async def _load(self, entry: VersionEntry) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        try:
            loaded = await loop.run_in_executor(
                self._loader_executor, load_version, entry.path, "cpu"
            )
            model = await loop.run_in_executor(self._loader_executor, self._prepare, loaded)
            if settings.warmup or settings.cuda_graphs:
                sizes = warmup_batch_sizes(settings.max_batch_size, self.capabilities.device)
                # On the inference thread, so warm-up never competes with a serving forward.
                await loop.run_in_executor(self._inference_executor, model.warmup, sizes)
        except ArtifactError as exc:
            self._fail(entry, f"{exc.path.name}: {exc.problem}")
            return
        except BackendUnavailable as exc:
            self._fail(entry, f"no backend can serve it: {exc}")
            return
        except Exception as exc:
            log.exception("loading %s failed", entry.label)
            self._fail(entry, f"{type(exc).__name__}: {exc}")
            return
        if self._closed:
            return
        self._serve(entry, model)

    def _prepare(self, loaded: LoadedVersion) -> InferenceModel:
        """Open the first backend that can serve the version (on the loader thread)."""
        settings = self.settings
        backend, skipped = open_backend(
            self.choices,
            loaded,
            self.capabilities,
            threads=settings.torch_threads or usable_cores(),
            max_batch_size=settings.max_batch_size,
            cuda_graphs=settings.cuda_graphs,
        )
        return InferenceModel(loaded, backend, settings.max_batch_size, skipped)

    def _serve(self, entry: VersionEntry, model: InferenceModel) -> None:
        settings = self.settings
        batcher: DynamicBatcher[InferenceItem, TopK] = DynamicBatcher(
            model.predict,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue=settings.max_queue_images,
            executor=self._inference_executor,
            on_batch=self._batch_hook(entry),
            name=f"{entry.name}-v{entry.version}",
        )
        batcher.start()
        entry.served = ServedVersion(model, batcher, datetime.now(UTC))
        entry.state, entry.error = VersionState.READY, None
        skipped = f" (skipped: {'; '.join(model.fallbacks)})" if model.fallbacks else ""
        log.info(
            "%s ready: %s, batch <= %d%s",
            entry.label,
            model.backend.describe(),
            settings.max_batch_size,
            skipped,
        )

    def _batch_hook(self, entry: VersionEntry) -> Callable[[BatchStats], None] | None:
        observer = self._on_batch
        if observer is None:
            return None
        return lambda stats: observer(entry, stats)

    def _fail(self, entry: VersionEntry, reason: str) -> None:
        if len(reason) > MAX_REASON_CHARS:  # e.g. every missing key of a state dict
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        entry.state, entry.error, entry.served = VersionState.FAILED, reason, None
        log.error("%s failed to load: %s", entry.label, reason)

    async def _unload_entry(self, entry: VersionEntry) -> None:
        served = entry.served
        entry.served = None
        if entry.state is not VersionState.FAILED:
            entry.state = VersionState.AVAILABLE
        if served is not None:
            log.info("unloading %s", entry.label)
            await served.batcher.close(drain=True)

    # -- metadata and aliases --------------------------------------------------------------
    async def metadata(self, entry: VersionEntry) -> ModelMetadata:
        if entry.served is not None:
            return entry.served.model.metadata
        return await asyncio.get_running_loop().run_in_executor(
            self._loader_executor, read_metadata, entry.path
        )

    async def set_alias(self, name: str, alias: str, version: int | None) -> ModelEntry:
        """Point ``alias`` at ``version`` (None removes it) in aliases.json, then rescan."""
        model = self.model(name)
        if version is not None and version not in model.versions:
            raise NotFound(
                f"version {version} of model {name!r} not found (versions: "
                f"{', '.join(map(str, sorted(model.versions)))})",
                code="unknown_version",
                details={"model": name, "version": str(version)},
            )
        if version is None and alias not in model.aliases:
            raise NotFound(
                f"model {name!r} has no alias {alias!r} (aliases: "
                f"{', '.join(sorted(model.aliases)) or 'none'})",
                code="unknown_alias",
                details={"model": name, "alias": alias},
            )
        aliases = dict(model.aliases)
        if version is None:
            del aliases[alias]
        else:
            aliases[alias] = version
        await asyncio.get_running_loop().run_in_executor(
            self._loader_executor, write_aliases, model.path, aliases
        )
        await self.scan()
        return self.model(name)

    async def close(self) -> None:
        self._closed = True
        for model in self.models.values():
            for entry in model.versions.values():
                if entry.load_task is not None and not entry.load_task.done():
                    entry.load_task.cancel()
                await self._unload_entry(entry)


def _list_repository(repo: Path) -> dict[str, tuple[list[int], dict[str, int], str | None]]:
    """name -> (versions, aliases, aliases error) for every model folder with a version."""
    listing: dict[str, tuple[list[int], dict[str, int], str | None]] = {}
    for name in list_models(repo):
        versions = list_versions(repo / name)
        if not versions:
            continue
        aliases: dict[str, int] = {}
        error = None
        try:
            aliases = read_aliases(repo / name)
        except ArtifactError as exc:
            error = f"{exc.path.name}: {exc.problem}"
        listing[name] = (versions, aliases, error)
    return listing


def repository_has_models(repo: Path) -> bool:
    return bool(_list_repository(repo)) if repo.is_dir() else False


def describe_version(model: ModelEntry, entry: VersionEntry) -> VersionInfo:
    """The state of one version as the API shows it."""
    served = entry.served
    backend = served.model.backend if served else None
    return VersionInfo(
        version=entry.version,
        state=entry.state.value,
        error=entry.error,
        aliases=model.aliases_of(entry.version),
        pinned=entry.pinned,
        loaded_at=served.loaded_at.isoformat() if served else None,
        queue_depth=served.batcher.queue_depth if served else None,
        backend=backend.name if backend else None,
        precision=backend.precision if backend else None,
        device=str(backend.device) if backend else None,
        skipped_backends=served.model.fallbacks if served else [],
    )
