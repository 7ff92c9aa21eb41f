"""Model versions on disk: publish, read, check and load them (torch).

The contract itself (``model.json``, names, file names) is ``wastenet.schema``.

Layout (see DESIGN.md)::

    models/<name>/aliases.json            optional {"production": 3, "staging": 4}
    models/<name>/<version>/weights.safetensors
    models/<name>/<version>/model.onnx, model.int8.onnx   optional exported files
    models/<name>/<version>/model.json

Publishing is atomic: the version is written into a hidden temporary folder inside
``models/<name>/`` and renamed to the next free integer; rename(2) refuses a non-empty
target, so concurrent publishers get distinct versions and a reader never sees a
half-written one. Exported files are copied into the temporary folder too, so they appear
with the version. Publishing weights that a version of the model already holds is refused
unless forced; the check runs before the rename, so two publishers of the same weights at
the same moment could still both succeed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from wastenet.nets import build_model
from wastenet.schema import (
    ALIAS_RE,
    ALIASES_FILE,
    FORMAT_VERSION,
    METADATA_FILE,
    MODEL_NAME_RE,
    RESERVED_ALIASES,
    VERSION_RULE,
    WEIGHTS_FILE,
    DerivedFrom,
    Evaluation,
    ExportedFile,
    ModelConfig,
    ModelMetadata,
    Preprocessing,
    parse_version,
    validate_model_name,
)

_TMP_PREFIX = ".tmp-"


class ArtifactError(Exception):
    """A model version (or the repository around it) is unusable; names the file and why."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: int
    path: Path


@dataclass
class LoadedVersion:
    ref: VersionRef
    metadata: ModelMetadata
    model: nn.Module


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    net = inner if isinstance(inner, nn.Module) else model
    # safetensors refuses shared or non-contiguous storage; copies cost little here.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}


def list_versions(model_dir: Path) -> list[int]:
    """Published version numbers under ``models/<name>/``, ascending.

    Only folders named by the version rule count (``wastenet.schema.parse_version``);
    temporary folders, stray files and folders like ``²`` or ``01`` are skipped.
    """
    if not model_dir.is_dir():
        return []
    versions = []
    for child in model_dir.iterdir():
        number = parse_version(child.name)
        if number is not None and child.is_dir():
            versions.append(number)
    return sorted(versions)


def list_models(repo: Path) -> list[str]:
    """Model names in the repository (folders with a valid name)."""
    if not repo.is_dir():
        return []
    return sorted(c.name for c in repo.iterdir() if c.is_dir() and MODEL_NAME_RE.fullmatch(c.name))


def weights_sha256(model: nn.Module) -> str:
    """The sha256 that ``model``'s weights file will have once published (same bytes)."""
    return hashlib.sha256(safetensors.torch.save(_state_dict_for_saving(model))).hexdigest()


class DuplicateVersionError(ValueError):
    """A version of the model already holds these weights (and the exported files asked for)."""

    def __init__(self, existing: VersionRef, message: str) -> None:
        self.existing = existing
        super().__init__(message)


def find_duplicate(
    model_dir: Path, weights_sha: str, precisions: Collection[str] = (), derived: bool = False
) -> VersionRef | None:
    """The newest version under ``model_dir`` that already holds weights ``weights_sha``.

    For a fresh publish any such version counts. A derived version reuses the weights on
    purpose (to add exported files), so only a version that also ships every precision in
    ``precisions`` counts. Unreadable versions are skipped.
    """
    for version in reversed(list_versions(model_dir)):
        path = model_dir / str(version)
        try:
            metadata = read_metadata(path)
        except ArtifactError:
            continue
        shipped = {e.precision for e in metadata.exports}
        if metadata.weights_sha256 == weights_sha and (not derived or set(precisions) <= shipped):
            return VersionRef(model_dir.name, version, path)
    return None


def refuse_duplicate(
    model_dir: Path, weights_sha: str, precisions: Collection[str] = (), derived: bool = False
) -> None:
    """Raise DuplicateVersionError naming the version that already holds these weights."""
    existing = find_duplicate(model_dir, weights_sha, precisions, derived)
    if existing is None:
        return
    shipped = f" with {' and '.join(precisions)} ONNX" if derived and precisions else ""
    raise DuplicateVersionError(
        existing,
        f"these weights (sha256 {weights_sha[:12]}...) are already published{shipped} as "
        f"{existing.name} version {existing.version} ({existing.path}); pass --force to "
        "publish them again as a new version",
    )


def publish_version(
    repo: str | os.PathLike[str],
    name: str,
    model: nn.Module,
    config: ModelConfig,
    class_names: list[str] | tuple[str, ...],
    evaluation: Evaluation | Mapping[str, Any],
    preprocessing: Preprocessing | None = None,
    training_config: Mapping[str, Any] | None = None,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
    *,
    exports: Sequence[tuple[Path, ExportedFile]] = (),
    force: bool = False,
) -> VersionRef:
    """Write ``model`` as the next version of ``name`` in ``repo`` and return where it went.

    ``extra`` adds keys to ``model.json`` (for example the full resolved training config).
    ``exports`` are exported files (where each is now, and its record) copied into the
    version before it appears. Weights that a version of ``name`` already holds are refused
    (DuplicateVersionError) unless ``force``.
    """
    validate_model_name(name)

    def build(weights_sha: str, exported: list[ExportedFile]) -> ModelMetadata:
        return ModelMetadata(
            format_version=FORMAT_VERSION,
            architecture=config,
            class_names=list(class_names),
            preprocessing=preprocessing or Preprocessing(),
            weights_sha256=weights_sha,
            evaluation=Evaluation.model_validate(evaluation),
            training_config_digest=config_digest(dict(training_config or {})),
            created_at=datetime.now(UTC),
            torch_version=torch.__version__,
            torchvision_version=torchvision.__version__,
            description=description,
            exports=exported,
            **dict(extra or {}),
        )

    return _publish(Path(repo) / name, model, build, exports, force, derived=False)


def publish_derived(
    source: LoadedVersion,
    exports: Sequence[tuple[Path, ExportedFile]],
    *,
    force: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> VersionRef:
    """Publish the next version of ``source``'s model: the same weights and metadata, plus
    ``exports`` and ``derived_from``. Refused (DuplicateVersionError) when a version with
    these weights already ships the same exported precisions, unless ``force``."""
    meta, ref = source.metadata, source.ref
    derived = DerivedFrom(name=ref.name, version=ref.version, weights_sha256=meta.weights_sha256)

    def build(weights_sha: str, exported: list[ExportedFile]) -> ModelMetadata:
        if weights_sha != meta.weights_sha256:
            raise ArtifactError(
                ref.path / WEIGHTS_FILE,
                f"saving the loaded weights again gave sha256 {weights_sha[:12]}..., not the "
                f"{meta.weights_sha256[:12]}... of the source version",
            )
        update = {"exports": exported, "derived_from": derived, "created_at": datetime.now(UTC)}
        return ModelMetadata.model_validate({**meta.model_dump(), **update, **dict(extra or {})})

    return _publish(ref.path.parent, source.model, build, exports, force, derived=True)


def _copy_export(source: Path, record: ExportedFile, folder: Path) -> ExportedFile:
    target = folder / record.file
    shutil.copyfile(source, target)
    if sha256_file(target) != record.sha256:
        raise ArtifactError(source, f"changed while being published as {record.file}")
    return record


def _publish(
    model_dir: Path,
    model: nn.Module,
    build: Callable[[str, list[ExportedFile]], ModelMetadata],
    exports: Sequence[tuple[Path, ExportedFile]],
    force: bool,
    derived: bool,
) -> VersionRef:
    """Weights, exported files and model.json into a temporary folder, then the rename."""
    name = model_dir.name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=model_dir))
    try:
        weights_path = tmp / WEIGHTS_FILE
        safetensors.torch.save_file(_state_dict_for_saving(model), str(weights_path))
        exported = [_copy_export(path, record, tmp) for path, record in exports]
        metadata = build(sha256_file(weights_path), exported)
        if not force:
            precisions = [e.precision for e in exported]
            refuse_duplicate(model_dir, metadata.weights_sha256, precisions, derived)
        metadata.check_consistent()
        (tmp / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n")
        _make_readable(tmp)
        version = _rename_to_next_version(tmp, model_dir)
        return VersionRef(name, version, model_dir / str(version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask, read without setting it: os.umask() changes it for every thread."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (macOS): the racy way
    os.umask(mask)
    return mask


def _make_readable(folder: Path) -> None:
    """Give a version's folder and files the modes a plain mkdir/open would (0777/0666 less
    the umask): mkdtemp makes 0700 and safetensors 0600, which a service running as another
    user (the image's UID 10001 over a read-only mount) could not read."""
    umask = _umask()
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    folder.chmod(0o777 & ~umask)


def _rename_to_next_version(tmp: Path, model_dir: Path) -> int:
    floor = 1
    while True:
        version = max(max(list_versions(model_dir), default=0) + 1, floor)
        target = model_dir / str(version)
        try:
            os.rename(tmp, target)
        except OSError:
            if target.exists() or target.is_symlink():
                # Another publisher took this number first, or a stray file or link holds
                # the name (list_versions skips those): never reuse it, try the next one.
                floor = version + 1
                continue
            raise
        return version


def read_metadata(version_dir: str | os.PathLike[str]) -> ModelMetadata:
    """Parse and validate ``model.json``; raise ArtifactError naming the problem."""
    path = Path(version_dir) / METADATA_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ArtifactError(path, "missing") from None
    except OSError as exc:
        raise ArtifactError(path, f"unreadable: {exc.strerror}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    try:
        metadata = ModelMetadata.model_validate(raw)
        metadata.check_consistent()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ArtifactError(path, f"incomplete or invalid metadata: {problems}") from exc
    except ValueError as exc:
        raise ArtifactError(path, f"inconsistent metadata: {exc}") from exc
    return metadata


def read_checked(path: Path, expected_sha256: str) -> bytes:
    """Read a version's file once and check its sha256; raise ArtifactError naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(path, "missing") from None
    except OSError as exc:
        raise ArtifactError(path, f"unreadable: {exc.strerror}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ArtifactError(
            path,
            f"sha256 mismatch: model.json says {expected_sha256[:12]}..., file has "
            f"{actual[:12]}... ({len(data)} bytes); the file was modified or truncated",
        )
    return data


def read_weights(
    version_dir: str | os.PathLike[str], expected_sha256: str
) -> dict[str, torch.Tensor]:
    """Read the weights once, check their sha256, and parse them from the same bytes."""
    path = Path(version_dir) / WEIGHTS_FILE
    data = read_checked(path, expected_sha256)
    try:
        return safetensors.torch.load(data)
    except Exception as exc:
        raise ArtifactError(path, f"not a readable safetensors file: {exc}") from exc


def read_export(version_dir: str | os.PathLike[str], exported: ExportedFile) -> bytes:
    """The bytes of an exported file (e.g. ``model.int8.onnx``), checked against model.json."""
    return read_checked(Path(version_dir) / exported.file, exported.sha256)


def parse_version_dir(version_dir: Path) -> VersionRef:
    number = parse_version(version_dir.name)
    if number is None:
        raise ArtifactError(version_dir, f"a version folder must be named by {VERSION_RULE}")
    return VersionRef(version_dir.parent.name, number, version_dir)


def load_version(
    version_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> LoadedVersion:
    """Rebuild the network from ``model.json`` alone and load its checked weights (eval mode)."""
    vdir = Path(version_dir)
    ref = parse_version_dir(vdir)
    metadata = read_metadata(vdir)
    state = read_weights(vdir, metadata.weights_sha256)
    model = build_model(metadata.architecture)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise ArtifactError(
            vdir / WEIGHTS_FILE, f"weights do not fit the architecture in model.json: {detail}"
        ) from exc
    model.eval()
    model.to(map_location)
    return LoadedVersion(ref=ref, metadata=metadata, model=model)


def read_aliases(model_dir: str | os.PathLike[str]) -> dict[str, int]:
    """``aliases.json`` of a model ({} when absent); raise ArtifactError when malformed."""
    path = Path(model_dir) / ALIASES_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    # The problem names no path: the service shows it to clients.
    except OSError as exc:
        raise ArtifactError(path, f"unreadable: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise ArtifactError(path, f"not UTF-8 text (byte {exc.start})") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(path, "aliases must be a JSON object of alias -> version")
    aliases: dict[str, int] = {}
    for alias, version in raw.items():
        if not ALIAS_RE.fullmatch(alias) or alias in RESERVED_ALIASES:
            raise ArtifactError(path, f"invalid alias name {alias!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArtifactError(
                path, f"alias {alias!r} must point to a positive integer, got {version!r}"
            )
        aliases[alias] = version
    return aliases


def write_aliases(model_dir: str | os.PathLike[str], aliases: Mapping[str, int]) -> None:
    """Replace ``aliases.json`` atomically (write a temp file, then rename over)."""
    path = Path(model_dir) / ALIASES_FILE
    for alias, version in aliases.items():
        if not ALIAS_RE.fullmatch(alias) or alias in RESERVED_ALIASES:
            raise ValueError(f"invalid alias name {alias!r}: use a-z 0-9 _ -, not 'latest'")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"alias {alias!r} must point to a positive integer, got {version!r}")
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent, suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(sorted(aliases.items())), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
