"""Readiness: whether start-up is done and the models' default versions can serve.

Liveness needs none of this (the route answers on its own). Readiness of the whole
service also needs the configured default model (WASTE_DEFAULT_MODEL) to exist; readiness
of one model looks at that model only.
"""

from __future__ import annotations

from app.errors import Unavailable
from app.lifecycle import Lifecycle
from app.registry import ModelRegistry
from app.schemas import Readiness


class Health:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    def ready(self, model: str | None = None) -> Readiness:
        """Model -> default version when ready; raise 503 with the reasons otherwise."""
        registry = self._lifecycle.require_registry()
        if model is not None:
            registry.model(model)  # 404 for unknown models
        self._require_started()
        names = [model] if model is not None else list(registry.models)
        reasons = registry.readiness(names)
        if model is None:
            reasons[:0] = self._default_model_missing(registry)
        if reasons:
            raise Unavailable(
                "not ready: " + "; ".join(reasons),
                code="not_ready",
                retry_after_s=5,
                details={"reasons": reasons},
            )
        return Readiness(
            models={name: registry.default_version(registry.models[name]) for name in names}
        )

    def _require_started(self) -> None:
        lifecycle = self._lifecycle
        if lifecycle.startup_error is not None:
            raise Unavailable(
                f"start-up failed: {lifecycle.startup_error}", code="not_ready", retry_after_s=30
            )
        if not lifecycle.started:
            raise Unavailable(f"not ready: {lifecycle.stage}", code="not_ready", retry_after_s=5)

    def _default_model_missing(self, registry: ModelRegistry) -> list[str]:
        default = self._lifecycle.settings.default_model
        if default in registry.models:
            return []
        models = ", ".join(sorted(registry.models)) or "none"
        return [
            f"the default model {default!r} is not in the model repository "
            f"(WASTE_DEFAULT_MODEL; models: {models})"
        ]
