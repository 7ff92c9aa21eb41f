"""HTTP routes: thin wrappers over :class:`app.service.Service`."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import Forbidden, Unauthorized, Unprocessable, error_responses
from app.schemas import (
    AliasUpdate,
    Liveness,
    ModelInfo,
    ModelList,
    PredictResponse,
    Readiness,
    ScanResult,
    VersionDetail,
    VersionInfo,
)
from app.service import Service, service_from
from wastenet.schema import ALIAS_RE, RESERVED_ALIASES

ServiceDep = Annotated[Service, Depends(service_from)]
ModelName = Annotated[str, Path(description="Model name, e.g. waste-resnet18-cbam.")]
VersionSpec = Annotated[
    str,
    Path(description="A version number, 'latest' (highest ready version) or an alias."),
]
VersionNumber = Annotated[int, Path(ge=1, description="A version number.")]
TopK = Annotated[
    int, Query(ge=1, le=1000, description="How many classes to return per image (<= classes).")
]

_MULTIPART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more images: JPEG, PNG, WebP, BMP, GIF "
                            "(first frame) or TIFF.",
                        }
                    },
                }
            }
        },
    }
}
_PREDICT_ERRORS = error_responses(400, 404, 413, 415, 422, 503)

router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="WASTE_ADMIN_TOKEN")


# -- health ------------------------------------------------------------------------------
@router.get("/health/live", tags=["health"], response_model=Liveness)
async def live() -> dict[str, str]:
    """The process is up. Never depends on models."""
    return {"status": "alive"}


@router.get(
    "/health/ready", tags=["health"], response_model=Readiness, responses=error_responses(503)
)
async def ready(service: ServiceDep) -> dict[str, Any]:
    """200 when every model's default version is loaded and warmed; 503 with the reasons."""
    return {"status": "ready", "models": service.readiness()}


@router.get(
    "/health/ready/{name}",
    tags=["health"],
    response_model=Readiness,
    responses=error_responses(404, 503),
)
async def ready_model(name: ModelName, service: ServiceDep) -> dict[str, Any]:
    """200 when this model's default version is loaded and warmed."""
    return {"status": "ready", "models": service.readiness(name)}


# -- models ------------------------------------------------------------------------------
@router.get("/v1/models", tags=["models"], response_model=ModelList, responses=error_responses(503))
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """Every model: its versions and their states, aliases and default version."""
    return service.model_list()


@router.get(
    "/v1/models/{name}",
    tags=["models"],
    response_model=ModelInfo,
    responses=error_responses(404, 503),
)
async def get_model(name: ModelName, service: ServiceDep) -> dict[str, Any]:
    return service.model_info(name)


@router.get(
    "/v1/models/{name}/versions/{version}",
    tags=["models"],
    response_model=VersionDetail,
    responses=error_responses(404, 503),
)
async def get_version(name: ModelName, version: VersionSpec, service: ServiceDep) -> Any:
    """State and model.json of one version: classes, architecture, preprocessing, evaluation."""
    return await service.version_detail(name, version)


# -- predict -----------------------------------------------------------------------------
@router.post(
    "/v1/models/{name}/versions/{version}/predict",
    tags=["predict"],
    response_model=PredictResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_MULTIPART_BODY,
)
async def predict_version(
    request: Request, name: ModelName, version: VersionSpec, service: ServiceDep, top_k: TopK = 3
) -> Response:
    """Classify the uploaded images with a named version (number, 'latest' or alias)."""
    return JSONResponse(await service.predict(request, name, version, top_k))


@router.post(
    "/v1/models/{name}/predict",
    tags=["predict"],
    response_model=PredictResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_MULTIPART_BODY,
)
async def predict_model(
    request: Request, name: ModelName, service: ServiceDep, top_k: TopK = 3
) -> Response:
    """Classify with the model's default version (alias 'production', else 'latest')."""
    return JSONResponse(await service.predict(request, name, None, top_k))


@router.post(
    "/v1/predict",
    tags=["predict"],
    response_model=PredictResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_MULTIPART_BODY,
)
async def predict_default(request: Request, service: ServiceDep, top_k: TopK = 3) -> Response:
    """Classify with the service's default model (WASTE_DEFAULT_MODEL), default version."""
    return JSONResponse(await service.predict(request, None, None, top_k))


# -- metrics -----------------------------------------------------------------------------
@router.get(
    "/metrics",
    tags=["metrics"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics: requests, latency, queue time and depth, batch sizes, images/s."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- admin -------------------------------------------------------------------------------
async def require_admin(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Service:
    token = service.settings.admin_token
    if token is None:
        raise Forbidden(
            "admin endpoints are disabled: set WASTE_ADMIN_TOKEN to enable them",
            code="admin_disabled",
        )
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <WASTE_ADMIN_TOKEN>'")
    if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise Forbidden("the bearer token is not the admin token", code="invalid_token")
    return service


AdminDep = Annotated[Service, Depends(require_admin)]
_ADMIN_ERRORS = error_responses(401, 403, 404, 503)


@router.post("/v1/admin/rescan", tags=["admin"], response_model=ScanResult, responses=_ADMIN_ERRORS)
async def rescan(
    service: AdminDep,
    retry_failed: Annotated[bool, Query(description="Also retry versions that failed.")] = False,
) -> dict[str, list[str]]:
    """Re-read the model repository: new versions, removed ones, aliases; load per the rule."""
    report = await service.require_registry().scan(retry_failed=retry_failed)
    return report.as_dict()


@router.post(
    "/v1/admin/models/{name}/versions/{version}/load",
    tags=["admin"],
    response_model=VersionInfo,
    responses=error_responses(401, 403, 404, 422, 503),
)
async def load_version(name: ModelName, version: VersionNumber, service: AdminDep) -> Any:
    """Load (and pin) a version; 422 with the reason when it cannot be loaded."""
    return await service.admin_load(name, version)


@router.post(
    "/v1/admin/models/{name}/versions/{version}/unload",
    tags=["admin"],
    response_model=VersionInfo,
    responses=_ADMIN_ERRORS,
)
async def unload_version(name: ModelName, version: VersionNumber, service: AdminDep) -> Any:
    """Unload a version; its queued requests are still answered."""
    return await service.admin_unload(name, version)


AliasName = Annotated[
    str, Path(description="Alias name (a-z 0-9 _ -, not 'latest'), e.g. production.")
]


@router.put(
    "/v1/admin/models/{name}/aliases/{alias}",
    tags=["admin"],
    response_model=ModelInfo,
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
async def set_alias(name: ModelName, alias: AliasName, body: AliasUpdate, service: AdminDep) -> Any:
    """Point an alias at a version (written to aliases.json) and load that version."""
    _check_alias(alias)
    return await service.admin_set_alias(name, alias, body.version)


@router.delete(
    "/v1/admin/models/{name}/aliases/{alias}",
    tags=["admin"],
    response_model=ModelInfo,
    responses=error_responses(401, 403, 404, 409, 503),
)
async def delete_alias(name: ModelName, alias: AliasName, service: AdminDep) -> Any:
    """Remove an alias from aliases.json."""
    return await service.admin_set_alias(name, alias, None)


def _check_alias(alias: str) -> None:
    if not ALIAS_RE.fullmatch(alias) or alias in RESERVED_ALIASES:
        raise Unprocessable(
            f"invalid alias name {alias!r}: use 1-32 characters a-z 0-9 _ -, starting with a "
            "letter, and not 'latest'",
            code="invalid_alias",
        )
