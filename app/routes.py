"""HTTP routes: thin wrappers over :class:`app.service.Service`."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BeforeValidator, WithJsonSchema

from app.errors import BadRequest, Unprocessable, error_responses
from app.params import ModelName, VersionSpec
from app.schemas import (
    VERSION_NUMBER_PATTERN,
    AliasUpdate,
    ExplainResponse,
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
from wastenet.schema import (
    ALIAS_RE,
    MAX_VERSION,
    RESERVED_ALIASES,
    VERSION_RULE,
    parse_version,
)

ServiceDep = Annotated[Service, Depends(service_from)]


def _version_text(value: object) -> object:
    # pydantic reads '01', '+1', '1_0' and '1.0' as 1: only the version rule names a version.
    if isinstance(value, str) and parse_version(value) is None:
        raise ValueError(f"a version number is {VERSION_RULE}")
    return value


# A number, but a path segment: documented as the same string type as VersionSpec.
VersionNumber = Annotated[
    int,
    Path(ge=1, le=MAX_VERSION, description=f"A version number ({VERSION_RULE})."),
    BeforeValidator(_version_text),
    WithJsonSchema({"type": "string", "pattern": VERSION_NUMBER_PATTERN}),
]
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
_PREDICT_ERRORS = error_responses(400, 404, 408, 413, 415, 422, 503)
MinConfidence = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=1.0,
        description="Images whose top probability is below this get label 'uncertain' "
        "(class_index null, top_k still given), e.g. for manual sorting. Default: "
        "WASTE_MIN_CONFIDENCE (0 unless set: never uncertain).",
    ),
]
Target = Annotated[
    str | None,
    Query(
        description="Class name whose Grad-CAM to compute (e.g. 'metal'); default: each "
        "image's predicted class."
    ),
]

router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="WASTE_ADMIN_TOKEN")


# -- health ------------------------------------------------------------------------------
@router.get("/health/live", tags=["health"], response_model=Liveness)
async def live() -> Liveness:
    """The process is up. Never depends on models."""
    return Liveness()


@router.get(
    "/health/ready", tags=["health"], response_model=Readiness, responses=error_responses(503)
)
async def ready(service: ServiceDep) -> Readiness:
    """200 when every model's default version is loaded and warmed; 503 with the reasons."""
    return service.health.ready()


@router.get(
    "/health/ready/{name}",
    tags=["health"],
    response_model=Readiness,
    responses=error_responses(404, 422, 503),
)
async def ready_model(name: ModelName, service: ServiceDep) -> Readiness:
    """200 when this model's default version is loaded and warmed."""
    return service.health.ready(name)


# -- models ------------------------------------------------------------------------------
@router.get("/v1/models", tags=["models"], response_model=ModelList, responses=error_responses(503))
async def list_models(service: ServiceDep) -> ModelList:
    """Every model: its versions and their states, aliases and default version."""
    return service.catalog.models()


@router.get(
    "/v1/models/{name}",
    tags=["models"],
    response_model=ModelInfo,
    responses=error_responses(404, 422, 503),
)
async def get_model(name: ModelName, service: ServiceDep) -> ModelInfo:
    return service.catalog.model(name)


@router.get(
    "/v1/models/{name}/versions/{version}",
    tags=["models"],
    response_model=VersionDetail,
    responses=error_responses(404, 422, 503),
)
async def get_version(name: ModelName, version: VersionSpec, service: ServiceDep) -> VersionDetail:
    """State and model.json of one version: classes, architecture, preprocessing, evaluation."""
    return await service.catalog.version(name, version)


# -- predict -----------------------------------------------------------------------------
@router.post(
    "/v1/models/{name}/versions/{version}/predict",
    tags=["predict"],
    response_model=PredictResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_MULTIPART_BODY,
)
async def predict_version(
    request: Request,
    name: ModelName,
    version: VersionSpec,
    service: ServiceDep,
    top_k: TopK = 3,
    min_confidence: MinConfidence = None,
) -> PredictResponse:
    """Classify the uploaded images with a named version (number, 'latest' or alias)."""
    return await service.predictor.predict(request, name, version, top_k, min_confidence)


@router.post(
    "/v1/models/{name}/predict",
    tags=["predict"],
    response_model=PredictResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_MULTIPART_BODY,
)
async def predict_model(
    request: Request,
    name: ModelName,
    service: ServiceDep,
    top_k: TopK = 3,
    min_confidence: MinConfidence = None,
) -> PredictResponse:
    """Classify with the model's default version (alias 'production', else 'latest')."""
    return await service.predictor.predict(request, name, None, top_k, min_confidence)


@router.post(
    "/v1/predict",
    tags=["predict"],
    response_model=PredictResponse,
    responses=_PREDICT_ERRORS,
    openapi_extra=_MULTIPART_BODY,
)
async def predict_default(
    request: Request, service: ServiceDep, top_k: TopK = 3, min_confidence: MinConfidence = None
) -> PredictResponse:
    """Classify with the service's default model (WASTE_DEFAULT_MODEL), default version."""
    return await service.predictor.predict(request, None, None, top_k, min_confidence)


# -- explain -----------------------------------------------------------------------------
_EXPLAIN_ERRORS = error_responses(400, 404, 408, 413, 415, 422, 503)
_EXPLAIN_NOTE = (
    " Grad-CAM of the predicted (or the `target`) class and, for CBAM networks, the last "
    "stage's spatial attention, each as a small array and a PNG overlay (base64). Computed "
    "in fp32 torch outside the prediction batcher, at most WASTE_EXPLAIN_CONCURRENCY at "
    "once with WASTE_EXPLAIN_QUEUE waiting; beyond that 503 explain_busy with Retry-After."
)


@router.post(
    "/v1/models/{name}/versions/{version}/explain",
    tags=["explain"],
    response_model=ExplainResponse,
    responses=_EXPLAIN_ERRORS,
    openapi_extra=_MULTIPART_BODY,
    description="Explain the uploaded images with a named version (number, 'latest' or "
    "alias)." + _EXPLAIN_NOTE,
)
async def explain_version(
    request: Request,
    name: ModelName,
    version: VersionSpec,
    service: ServiceDep,
    top_k: TopK = 3,
    target: Target = None,
) -> ExplainResponse:
    return await service.explainer.explain(request, name, version, top_k, target)


@router.post(
    "/v1/models/{name}/explain",
    tags=["explain"],
    response_model=ExplainResponse,
    responses=_EXPLAIN_ERRORS,
    openapi_extra=_MULTIPART_BODY,
    description="Explain with the model's default version." + _EXPLAIN_NOTE,
)
async def explain_model(
    request: Request, name: ModelName, service: ServiceDep, top_k: TopK = 3, target: Target = None
) -> ExplainResponse:
    return await service.explainer.explain(request, name, None, top_k, target)


@router.post(
    "/v1/explain",
    tags=["explain"],
    response_model=ExplainResponse,
    responses=_EXPLAIN_ERRORS,
    openapi_extra=_MULTIPART_BODY,
    description="Explain with the service's default model and its default version." + _EXPLAIN_NOTE,
)
async def explain_default(
    request: Request, service: ServiceDep, top_k: TopK = 3, target: Target = None
) -> ExplainResponse:
    return await service.explainer.explain(request, None, None, top_k, target)


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
    service.admin.authorize(credentials)
    return service


class _AuthFirstRoute(APIRoute):
    """An admin route that checks the bearer token before FastAPI reads the body.

    FastAPI parses the body before it solves dependencies, so ``require_admin`` alone
    would let an anonymous caller see 400/422 answers about a body it may not send. The
    dependency stays: it is what declares the bearer scheme in the OpenAPI document.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def authorized(request: Request) -> Response:
            service = await service_from(request)
            service.admin.authorize(await _bearer(request))
            if takes_body:
                await _require_utf8(request)
            return await handler(request)

        return authorized


async def _require_utf8(request: Request) -> None:
    body = await request.body()  # cached on the request: the handler reads it again for free
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f'the request body is not UTF-8 (byte {exc.start}); send JSON such as {{"version": 2}}',
            code="bad_request",
        ) from None


admin_router = APIRouter(route_class=_AuthFirstRoute)
AdminDep = Annotated[Service, Depends(require_admin)]
Force = Annotated[
    bool,
    Query(description="Do it even when it leaves the model's default nothing to serve."),
]
_ADMIN_ERRORS = error_responses(401, 403, 404, 422, 503)


@admin_router.post(
    "/v1/admin/rescan", tags=["admin"], response_model=ScanResult, responses=_ADMIN_ERRORS
)
async def rescan(
    service: AdminDep,
    retry_failed: Annotated[bool, Query(description="Also retry versions that failed.")] = False,
) -> ScanResult:
    """Re-read the model repository: new versions, removed ones, aliases; load per the rule."""
    return await service.admin.rescan(retry_failed)


@admin_router.post(
    "/v1/admin/models/{name}/versions/{version}/load",
    tags=["admin"],
    response_model=VersionInfo,
    responses=error_responses(401, 403, 404, 422, 503),
)
async def load_version(name: ModelName, version: VersionNumber, service: AdminDep) -> VersionInfo:
    """Load (and pin) a version; 422 with the reason when it cannot be loaded."""
    return await service.admin.load(name, version)


@admin_router.post(
    "/v1/admin/models/{name}/versions/{version}/unload",
    tags=["admin"],
    response_model=VersionInfo,
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
async def unload_version(
    name: ModelName, version: VersionNumber, service: AdminDep, force: Force = False
) -> VersionInfo:
    """Unload a version; its queued requests are still answered. 409 when it is the model's
    only ready version or its 'production' alias points to it (unless forced)."""
    return await service.admin.unload(name, version, force)


# Documented, not enforced by FastAPI: _check_alias answers invalid_alias (see app.params).
AliasName = Annotated[
    str,
    Path(
        description="Alias name (a-z 0-9 _ -, starting with a letter, not 'latest'), e.g. "
        "production.",
        json_schema_extra={"pattern": ALIAS_RE.pattern},
    ),
]


@admin_router.put(
    "/v1/admin/models/{name}/aliases/{alias}",
    tags=["admin"],
    response_model=ModelInfo,
    responses=error_responses(400, 401, 403, 404, 409, 422, 503),
)
async def set_alias(
    name: ModelName, alias: AliasName, body: AliasUpdate, service: AdminDep, force: Force = False
) -> ModelInfo:
    """Point an alias at a version (written to aliases.json) and load that version. 409 when
    the version cannot be loaded or aliases.json cannot be read (unless forced)."""
    _check_alias(alias)
    return await service.admin.set_alias(name, alias, body.version, force)


@admin_router.delete(
    "/v1/admin/models/{name}/aliases/{alias}",
    tags=["admin"],
    response_model=ModelInfo,
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
async def delete_alias(
    name: ModelName, alias: AliasName, service: AdminDep, force: Force = False
) -> ModelInfo:
    """Remove an alias from aliases.json. 409 when removing 'production' leaves no ready
    version, or aliases.json cannot be read (unless forced)."""
    return await service.admin.set_alias(name, alias, None, force)


def _check_alias(alias: str) -> None:
    if not ALIAS_RE.fullmatch(alias) or alias in RESERVED_ALIASES:
        raise Unprocessable(
            f"invalid alias name {alias!r}: use 1-32 characters a-z 0-9 _ -, starting with a "
            "letter, and not 'latest'",
            code="invalid_alias",
        )


router.include_router(admin_router)
