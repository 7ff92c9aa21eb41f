"""Readiness: whether start-up is done and the configured default model answers.

Liveness needs none of this (the route answers on its own). The service is ready when
the default model (WASTE_DEFAULT_MODEL) answers with its default version; another model's
problem shows in that model's readiness and beside the answer, never in the service's
(one broken model must not take a replica out of its load balancer).
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
        """The default model's (or ``model``'s) readiness; 503 with the reason when not."""
        registry = self._lifecycle.require_registry()
        if model is not None:
            registry.model(model)  # 404 for unknown models
        self._require_started()
        if model is None:
            reason = self._default_model_missing(registry) or registry.unready_reason(
                self._lifecycle.settings.default_model
            )
        else:
            reason = registry.unready_reason(model)
        if reason is not None:
            raise Unavailable(
                f"not ready: {reason}",
                code="not_ready",
                retry_after_s=5,
                details={"reasons": [reason]},
            )
        names = [model] if model is not None else sorted(registry.models)
        versions: dict[str, int | None] = {}
        not_ready: dict[str, str] = {}
        for name in names:
            why = registry.unready_reason(name)
            versions[name] = None if why else registry.default_version(registry.models[name])
            if why is not None:
                not_ready[name] = why
        return Readiness(models=versions, not_ready=not_ready)

    def _require_started(self) -> None:
        lifecycle = self._lifecycle
        if lifecycle.startup_error is not None:
            raise Unavailable(
                f"start-up failed: {lifecycle.startup_error}", code="not_ready", retry_after_s=30
            )
        if not lifecycle.started:
            raise Unavailable(f"not ready: {lifecycle.stage}", code="not_ready", retry_after_s=5)

    def _default_model_missing(self, registry: ModelRegistry) -> str | None:
        default = self._lifecycle.settings.default_model
        if default in registry.models:
            return None
        models = ", ".join(sorted(registry.models)) or "none"
        return (
            f"the default model {default!r} is not in the model repository "
            f"(WASTE_DEFAULT_MODEL; models: {models})"
        )
