"""Admin use cases behind WASTE_ADMIN_TOKEN: rescan, load and unload versions, aliases."""

from __future__ import annotations

import secrets

from fastapi.security import HTTPAuthorizationCredentials

from app.catalog import model_info
from app.errors import Conflict, Forbidden, Unauthorized, Unprocessable
from app.lifecycle import Lifecycle
from app.registry import describe_version
from app.schemas import ModelInfo, ScanResult, VersionInfo


class Admin:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """403 when admin is disabled or the token is wrong, 401 when there is none."""
        token = self._lifecycle.settings.admin_token
        if token is None:
            raise Forbidden(
                "admin endpoints are disabled: set WASTE_ADMIN_TOKEN to enable them",
                code="admin_disabled",
            )
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthorized("admin endpoints need 'Authorization: Bearer <WASTE_ADMIN_TOKEN>'")
        if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise Forbidden("the bearer token is not the admin token", code="invalid_token")

    async def rescan(self, retry_failed: bool) -> ScanResult:
        """Re-read the repository and apply the loading rule; what changed."""
        report = await self._lifecycle.require_registry().scan(retry_failed=retry_failed)
        return report.as_result()

    async def load(self, name: str, version: int) -> VersionInfo:
        """Load and pin a version; 422 with the reason when it cannot be loaded."""
        registry = self._lifecycle.require_registry()
        entry = await registry.load(name, version, pin=True)
        if entry.error is not None:
            raise Unprocessable(
                f"{entry.label} cannot be loaded: {entry.error}",
                code="load_failed",
                details={"model": name, "version": version, "reason": entry.error},
            )
        return describe_version(registry.model(name), entry)

    async def unload(self, name: str, version: int, force: bool = False) -> VersionInfo:
        """Unload a version; 409 when the model's default would have nothing to serve."""
        registry = self._lifecycle.require_registry()
        entry = await registry.unload(name, version, force=force)
        return describe_version(registry.model(name), entry)

    async def set_alias(
        self, name: str, alias: str, version: int | None, force: bool = False
    ) -> ModelInfo:
        """Point ``alias`` at ``version`` in aliases.json (None removes it); 409 when the
        alias would have nothing to serve or aliases.json cannot be read."""
        registry = self._lifecycle.require_registry()
        try:
            await registry.set_alias(name, alias, version, force=force)
        except OSError as exc:
            raise Conflict(
                f"cannot write aliases.json of {name!r}: {exc.strerror or exc} (is the model "
                "repository mounted read-only?)",
                code="repository_not_writable",
            ) from None
        return model_info(registry, name)
