"""The model repository on disk as one listing: models, versions, aliases, and what is neither.

Nothing found in the repository is fatal. A stray file, a folder named ``²`` or ``01``, a
symbolic link to nothing or a folder that cannot be read becomes an :class:`Ignored` entry
(the registry logs it once and ``/v1/models`` shows it) and the rest still serves. Hidden
entries (publishing's ``.tmp-*`` folders, the bootstrap lock) and README files are skipped
without a word. Paths are relative to the repository, so that clients may see them.

A folder that cannot be listed is not the same as an empty one: the listing says so
(:attr:`RepositoryListing.unreadable`, :attr:`RepositoryListing.error`), and the registry
keeps serving what it had loaded from it instead of unloading it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from wastenet.artifacts import ArtifactError, read_aliases
from wastenet.schema import ALIASES_FILE, MODEL_NAME_RE, VERSION_RULE, parse_version

_MODEL_NAME_RULE = "1-64 characters a-z 0-9 . _ -, starting with a letter or digit"


@dataclass(frozen=True)
class Ignored:
    """An entry of the repository that is not a model or version, and why."""

    path: str  # relative to the repository, e.g. "waste-resnet18-cbam/²"
    reason: str


@dataclass(frozen=True)
class ModelListing:
    versions: list[int]
    aliases: dict[str, int] | None  # None when aliases.json exists but cannot be used
    aliases_error: str | None = None


@dataclass
class RepositoryListing:
    models: dict[str, ModelListing] = field(default_factory=dict)
    ignored: list[Ignored] = field(default_factory=list)
    # Model folders that exist but cannot be listed: what they served must stay.
    unreadable: set[str] = field(default_factory=set)
    # The repository itself cannot be listed: nothing in it may be taken as gone.
    error: str | None = None


def list_repository(repo: Path) -> RepositoryListing:
    """Every model with at least one version folder, and every entry that is ignored."""
    listing = RepositoryListing()
    try:
        names = sorted(os.listdir(repo))
        kinds = {name: _not_a_folder(repo / name, "model") for name in names}
    except OSError as exc:  # not listable, or listable but not searchable (mode r--)
        listing.error = f"the model repository cannot be read: {exc.strerror}"
        return listing
    for name in names:
        problem = kinds[name]
        if _skipped_silently(name, problem):
            continue
        if problem is None and not MODEL_NAME_RE.fullmatch(name):
            problem = f"not a valid model name: use {_MODEL_NAME_RULE}"
        if problem is not None:
            listing.ignored.append(Ignored(name, problem))
            continue
        _list_model(repo / name, listing)
    return listing


def _list_model(folder: Path, listing: RepositoryListing) -> None:
    name = folder.name
    try:
        children = sorted(os.listdir(folder))
        kinds = {child: _not_a_folder(folder / child, "version") for child in children}
    except OSError as exc:
        listing.unreadable.add(name)
        listing.ignored.append(Ignored(name, f"cannot be read: {exc.strerror}"))
        return
    versions = []
    for child in children:
        problem = kinds[child]
        if _skipped_silently(child, problem) or child == ALIASES_FILE:
            continue
        number = parse_version(child)
        if problem is None and number is not None:
            versions.append(number)
            continue
        reason = problem or f"not a version: a version folder is named by {VERSION_RULE}"
        listing.ignored.append(Ignored(f"{name}/{child}", reason))
    if not versions:
        return
    try:
        listing.models[name] = ModelListing(sorted(versions), read_aliases(folder))
    except ArtifactError as exc:
        listing.models[name] = ModelListing(
            sorted(versions), None, f"{ALIASES_FILE}: {exc.problem}"
        )


def _skipped_silently(name: str, not_a_folder: str | None) -> bool:
    """Hidden entries, and README files (a folder named readme-... may be a model)."""
    readme = name.upper().startswith("README") and not_a_folder is not None
    return name.startswith(".") or readme


def _not_a_folder(path: Path, what: str) -> str | None:
    """Why ``path`` is not a folder (following symbolic links), or None when it is one.
    Raises OSError when it cannot be looked at (a parent that cannot be searched)."""
    if path.is_dir():
        return None
    if path.is_symlink() and not path.exists():
        return "a symbolic link to nothing (or a loop)"
    return f"a file where a {what} folder is expected"
