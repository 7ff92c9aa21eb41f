"""What the service tells about its models: versions, states, aliases, defaults, model.json."""

from __future__ import annotations

import logging

from app.lifecycle import Lifecycle
from app.registry import ModelRegistry, describe_version, ignored_entries
from app.schemas import ModelInfo, ModelList, VersionDetail
from wastenet.artifacts import ArtifactError
from wastenet.schema import METADATA_FILE

log = logging.getLogger("app.catalog")


def model_info(registry: ModelRegistry, name: str) -> ModelInfo:
    """One model's versions with their states, its aliases and its default version."""
    model = registry.model(name)
    return ModelInfo(
        name=model.name,
        default_version=registry.default_version(model),
        default_selector=model.default_spec,
        latest_ready=model.latest_ready(),
        aliases=dict(sorted(model.aliases.items())),
        aliases_error=model.aliases_error,
        versions=[describe_version(model, e) for _, e in sorted(model.versions.items())],
    )


class Catalog:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    def models(self) -> ModelList:
        """Every model that has a version, in name order."""
        registry = self._lifecycle.require_registry()
        names = [n for n, m in sorted(registry.models.items()) if m.versions]
        return ModelList(
            default_model=self._lifecycle.settings.default_model,
            models=[model_info(registry, n) for n in names],
            ignored=ignored_entries(registry.ignored),
        )

    def model(self, name: str) -> ModelInfo:
        return model_info(self._lifecycle.require_registry(), name)

    async def version(self, name: str, spec: str) -> VersionDetail:
        """One version in any state, with its model.json (or why it cannot be read)."""
        registry = self._lifecycle.require_registry()
        model, entry = registry.find_version(name, spec)
        info = describe_version(model, entry)
        try:
            metadata = await registry.metadata(entry)
        except ArtifactError as exc:
            # The file's name only: the absolute path is the server's business.
            error = f"{exc.path.name}: {exc.problem}"
            return VersionDetail(
                **info.model_dump(), model=name, metadata=None, metadata_error=error
            )
        except Exception as exc:
            log.warning("reading model.json of %s failed", entry.label, exc_info=exc)
            error = f"{METADATA_FILE}: cannot be read ({type(exc).__name__})"
            return VersionDetail(
                **info.model_dump(), model=name, metadata=None, metadata_error=error
            )
        return VersionDetail(
            **info.model_dump(), model=name, metadata=metadata, metadata_error=None
        )
