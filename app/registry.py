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

What is on disk never stops a scan. Entries that are no model or version are ignored and
reported (:mod:`app.repository`). When ``aliases.json`` cannot be read, the aliases last
read stay in force and the error is reported: a broken file must not move traffic. Before
any good read the model's default is unknown, and requests that name no version get 503.

Admin changes that would leave a model's default with nothing to serve (unloading its
last ready version, pointing an alias at a version that cannot load) raise
:class:`~app.errors.Conflict` unless forced.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.backends import BackendUnavailable, open_backend
from app.batcher import BatchStats, DynamicBatcher
from app.errors import Conflict, NotFound, Unavailable, Unprocessable
from app.inference import InferenceItem, InferenceModel, TopK, usable_cores, warmup_batch_sizes
from app.repository import Ignored, ModelListing, RepositoryListing, list_repository
from app.schemas import IgnoredEntry, ScanResult, VersionInfo
from app.selection import Capabilities, Choice
from app.settings import Settings
from wastenet.artifacts import (
    ArtifactError,
    LoadedVersion,
    load_version,
    read_metadata,
    write_aliases,
)
from wastenet.schema import ALIAS_RE, ALIASES_FILE, VERSION_RULE, ModelMetadata, parse_version

log = logging.getLogger("app.registry")

DEFAULT_ALIAS = "production"
MAX_REASON_CHARS = 400
MAX_SHOWN_SPEC_CHARS = 40  # a 5,000-character version is named by its start
LATEST = "latest"
FORCE_HINT = "repeat with ?force=true to do it anyway"


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
    aliases_read: bool = False  # aliases.json was read (or absent) at least once

    @property
    def default_spec(self) -> str | None:
        """The selector answering requests that name no version; None when it is unknown
        (aliases.json has never been readable, so whether 'production' exists is unknown)."""
        if not self.aliases_read:
            return None
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
    ignored: list[Ignored] = field(default_factory=list)  # not a change: left out of as_dict

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": self.added,
            "removed": self.removed,
            "loaded": self.loaded,
            "failed": self.failed,
            "unloaded": self.unloaded,
        }

    def as_result(self) -> ScanResult:
        return ScanResult(**self.as_dict(), ignored=ignored_entries(self.ignored))


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
        self.ignored: list[Ignored] = []  # what the last scan could not use, and why
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
        """Resolve ``spec`` (int, 'latest', alias or None) to an entry in any state.

        A spec that is no version number (``VERSION_RULE``), not 'latest' and no alias name
        is 422; a well-formed one that names nothing is 404.
        """
        model = self.model(name)
        if spec is None:
            spec = model.default_spec
            if spec is None:
                raise self._default_unknown(model)
        if spec == LATEST:
            return model, self._latest(model)
        number = parse_version(spec)
        if number is not None:
            if number not in model.versions:
                raise NotFound(
                    f"version {number} of model {name!r} not found (versions: "
                    f"{', '.join(map(str, sorted(model.versions)))})",
                    code="unknown_version",
                    details={"model": name, "version": number},
                )
            return model, model.versions[number]
        if not ALIAS_RE.fullmatch(spec):
            shown = _shown(spec)
            raise Unprocessable(
                f"{shown!r} names no version of model {name!r}: use a version number "
                f"({VERSION_RULE}), 'latest' or an alias",
                code="invalid_version",
                details={"model": name, "requested": shown},
            )
        if not model.aliases_read:
            raise self._default_unknown(model)
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
            details={"model": name, "requested": spec},
        )

    def _latest(self, model: ModelEntry) -> VersionEntry:
        latest = model.latest_ready()
        if latest is None:
            raise Unavailable(
                f"model {model.name!r} has no ready version yet: {self._states_text(model)}",
                code="no_ready_version",
                retry_after_s=5,
                details={"model": model.name, "versions": self._states(model)},
            )
        return model.versions[latest]

    @staticmethod
    def _default_unknown(model: ModelEntry) -> Unavailable:
        return Unavailable(
            f"the aliases of model {model.name!r} are unknown: {model.aliases_error}, and no "
            "earlier copy was read. Name a version number or 'latest', or fix the file",
            code="aliases_unreadable",
            retry_after_s=30,
            details={"model": model.name, "reason": model.aliases_error},
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
        """The version answering requests that name none (None when that is unknown)."""
        spec = model.default_spec
        if spec is None:
            return None
        if spec == LATEST:
            return model.latest_ready()
        return model.aliases[DEFAULT_ALIAS]

    def unready_reason(self, name: str) -> str | None:
        """Why the model's default version cannot answer now (None: it can)."""
        try:
            self.resolve(name, None)
        except (NotFound, Unavailable) as exc:
            return exc.message
        return None

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
            return await self._scan(retry_failed)

    async def _scan(self, retry_failed: bool = False) -> ScanReport:
        report = ScanReport()
        listing = await asyncio.get_running_loop().run_in_executor(
            self._loader_executor, list_repository, self.repo
        )
        report.ignored = self._note_ignored(listing)
        if listing.error is not None:
            return report  # an unlistable repository is not an empty one: keep serving
        gone = set(self.models) - set(listing.models) - listing.unreadable
        for name in sorted(gone):
            for version in sorted(self.models[name].versions):
                await self._forget(self.models[name], version, report)
            del self.models[name]
        for name, listed in sorted(listing.models.items()):
            model = self.models.setdefault(name, ModelEntry(name, self.repo / name))
            self._update_aliases(model, listed)
            for version in sorted(set(model.versions) - set(listed.versions)):
                await self._forget(model, version, report)
            for version in listed.versions:
                if version not in model.versions:
                    model.versions[version] = VersionEntry(name, version, model.path / str(version))
                    report.added.append(f"{name} v{version}")
            if retry_failed:
                for entry in model.versions.values():
                    if entry.state is VersionState.FAILED:
                        entry.state, entry.error = VersionState.AVAILABLE, None
        # Every model and version is known (and listed as loading/available) before the
        # first load, so a request meanwhile gets 503 "loading", not 404.
        for name in sorted(listing.models):
            await self._apply_loading_rule(self.models[name], report)
        return report

    def _note_ignored(self, listing: RepositoryListing) -> list[Ignored]:
        """Remember what the repository holds that is no model or version; log what is new
        (once, not on every poll)."""
        ignored = list(listing.ignored)
        if listing.error is not None:
            ignored.insert(0, Ignored(".", f"{listing.error}; serving what was loaded"))
        known = set(self.ignored)
        for item in ignored:
            if item not in known:
                log.warning("model repository: ignoring %s: %s", item.path, item.reason)
        self.ignored = ignored
        return ignored

    @staticmethod
    def _update_aliases(model: ModelEntry, listed: ModelListing) -> None:
        """Take the aliases on disk, or keep the last good ones when the file is unusable."""
        if listed.aliases is not None:
            if model.aliases_error is not None:
                log.info("%s: %s is readable again", model.name, ALIASES_FILE)
            model.aliases, model.aliases_error, model.aliases_read = listed.aliases, None, True
            return
        if listed.aliases_error != model.aliases_error:
            kept = (
                f"keeping the aliases last read: {model.aliases}"
                if model.aliases_read
                else "requests that name no version get 503 until it is fixed"
            )
            log.error("%s: %s; %s", model.name, listed.aliases_error, kept)
        model.aliases_error = listed.aliases_error

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
                details={"model": name, "version": version},
            )
        if entry.state is VersionState.FAILED:
            entry.state, entry.error = VersionState.AVAILABLE, None  # an explicit retry
        if entry.state is not VersionState.READY:
            await self._load_entry(entry, ScanReport())
        if entry.state is VersionState.READY and pin:
            entry.pinned = True
        return entry

    async def unload(self, name: str, version: int, force: bool = False) -> VersionEntry:
        """Unload one version (admin); refused when the model's default would have nothing
        to serve, unless forced."""
        model = self.model(name)
        entry = model.versions.get(version)
        if entry is None:
            raise NotFound(
                f"version {version} of model {name!r} not found",
                code="unknown_version",
                details={"model": name, "version": version},
            )
        if entry.load_task is not None and not entry.load_task.done():
            await asyncio.shield(entry.load_task)
        if not force:
            _refuse_unload(model, entry)
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

    async def set_alias(
        self, name: str, alias: str, version: int | None, force: bool = False
    ) -> ModelEntry:
        """Point ``alias`` at ``version`` (None removes it) in aliases.json, then rescan.

        Unless forced, refused when aliases.json cannot be read (writing would replace what
        it holds) or when the alias would have nothing to serve: the target is loaded first
        and must become ready.
        """
        async with self._scan_lock:
            model = self.model(name)
            if version is not None and version not in model.versions:
                await self._scan()  # it may have been published since the last scan
                model = self.model(name)
            if not force:
                _refuse_unreadable_aliases(model)
            _check_alias_target(model, alias, version)
            if not force:
                await self._refuse_nothing_to_serve(model, alias, version)
            aliases = dict(model.aliases)
            if version is None:
                aliases.pop(alias, None)
            else:
                aliases[alias] = version
            await asyncio.get_running_loop().run_in_executor(
                self._loader_executor, write_aliases, model.path, aliases
            )
            await self._scan()
        return self.model(name)

    async def _refuse_nothing_to_serve(
        self, model: ModelEntry, alias: str, version: int | None
    ) -> None:
        """Conflict when the alias (or, once it is removed, the default) cannot serve; an
        available target is loaded first, a failed one is not retried."""
        if version is None:
            if alias == DEFAULT_ALIAS and model.latest_ready() is None:
                raise Conflict(
                    f"without alias {DEFAULT_ALIAS!r}, model {model.name!r} answers with "
                    f"'latest', and it has no ready version; {FORCE_HINT}",
                    code="nothing_to_serve",
                    details={"model": model.name, "alias": alias},
                )
            return
        entry = model.versions[version]
        if entry.state is VersionState.AVAILABLE:
            await self._load_entry(entry, ScanReport())
        elif entry.state is VersionState.LOADING and entry.load_task is not None:
            await asyncio.shield(entry.load_task)
        if entry.state is not VersionState.READY:
            raise Conflict(
                f"alias {alias!r} would have nothing to serve: {entry.label} "
                f"{entry.state.value} ({entry.error}). Load it first (an admin load retries a "
                f"failed version), or {FORCE_HINT}",
                code="nothing_to_serve",
                details={
                    "model": model.name,
                    "alias": alias,
                    "version": version,
                    "state": entry.state.value,
                    "reason": entry.error,
                },
            )

    async def close(self) -> None:
        self._closed = True
        for model in self.models.values():
            for entry in model.versions.values():
                if entry.load_task is not None and not entry.load_task.done():
                    entry.load_task.cancel()
                await self._unload_entry(entry)


def _check_alias_target(model: ModelEntry, alias: str, version: int | None) -> None:
    if version is not None and version not in model.versions:
        raise NotFound(
            f"version {version} of model {model.name!r} not found (versions: "
            f"{', '.join(map(str, sorted(model.versions)))})",
            code="unknown_version",
            details={"model": model.name, "version": version},
        )
    if version is None and alias not in model.aliases:
        raise NotFound(
            f"model {model.name!r} has no alias {alias!r} (aliases: "
            f"{', '.join(sorted(model.aliases)) or 'none'})",
            code="unknown_alias",
            details={"model": model.name, "alias": alias},
        )


def _refuse_unreadable_aliases(model: ModelEntry) -> None:
    if model.aliases_error is not None:
        raise Conflict(
            f"{ALIASES_FILE} of model {model.name!r} cannot be read ({model.aliases_error}) "
            f"and writing it would replace what it holds: fix the file, or {FORCE_HINT} "
            "(it then holds the aliases last read, changed)",
            code="aliases_unreadable",
            details={"model": model.name, "reason": model.aliases_error},
        )


def _refuse_unload(model: ModelEntry, entry: VersionEntry) -> None:
    """Conflict when unloading ``entry`` leaves the model's default nothing to serve."""
    if entry.state is not VersionState.READY:
        return
    others = [v for v in model.ready_versions() if v != entry.version]
    if not others:
        why = "it is the model's only ready version"
    elif model.default_spec == DEFAULT_ALIAS and model.aliases[DEFAULT_ALIAS] == entry.version:
        why = f"alias {DEFAULT_ALIAS!r} points to it (the model's default)"
    else:
        return
    raise Conflict(
        f"unloading {entry.label} would leave model {model.name!r} with nothing to serve: "
        f"{why}; {FORCE_HINT}",
        code="nothing_to_serve",
        details={"model": model.name, "version": entry.version},
    )


def _shown(spec: str) -> str:
    if len(spec) <= MAX_SHOWN_SPEC_CHARS:
        return spec
    return f"{spec[:MAX_SHOWN_SPEC_CHARS]}... ({len(spec)} characters)"


class RepositoryUnreadable(RuntimeError):
    """The model repository's folder itself cannot be listed."""


def repository_has_models(repo: Path) -> bool:
    if not repo.is_dir():
        return False
    listing = list_repository(repo)
    if listing.error is not None:
        # At start-up an unreadable repository is a setting to fix, not an empty one to
        # bootstrap into.
        raise RepositoryUnreadable(f"WASTE_MODEL_DIR={str(repo)!r}: {listing.error}")
    return bool(listing.models)


def ignored_entries(ignored: list[Ignored]) -> list[IgnoredEntry]:
    return [IgnoredEntry(path=item.path, reason=item.reason) for item in ignored]


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
