"""Domain errors and their one mapping to HTTP.

Every error the service answers has the same JSON shape (:class:`ErrorResponse`)::

    {"error": {"code": "unknown_model", "message": "model 'x' not found ...", "details": {...}}}

Domain code raises :class:`ServiceError` subclasses; :func:`install_error_handlers` maps
them, FastAPI's validation errors, Starlette's HTTP errors and anything unexpected to that
shape. Unexpected exceptions are logged with their traceback and answered with a generic
500 that never includes the traceback.

Routes under ``/v2`` speak the Open Inference Protocol, whose clients read its own shape,
``{"error": "message"}`` (:class:`ProtocolErrorResponse`): the same errors, statuses and
headers, in that shape; a request that fails validation there is a 400, as the protocol
has it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.schemas import Answer

log = logging.getLogger("app")


class Problem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(description="Where: 'query.top_k', 'path.version', 'body.version'.")
    problem: str = Field(description="What is wrong with it.")


class FileRejection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str
    code: str = Field(description="This file's error code, e.g. 'undecodable_image'.")
    message: str
    status: int = Field(description="The status this file alone would have had.")


class ErrorDetails(BaseModel):
    """Structured context of an error: each code sends the keys that apply to it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="The model the error is about.")
    version: int | None = Field(default=None, description="The version's number.")
    requested: str | None = Field(
        default=None,
        description="The version as the request wrote it, where that names no number "
        "(an alias, or a malformed version, cut short).",
    )
    alias: str | None = Field(default=None, description="The alias the error is about.")
    state: Literal["available", "loading", "ready", "failed"] | None = Field(
        default=None, description="The version's state."
    )
    reason: str | None = Field(default=None, description="Why it failed or is unreadable.")
    versions: dict[str, str] | None = Field(
        default=None, description="Version number -> state, of every version of the model."
    )
    reasons: list[str] | None = Field(default=None, description="Why the service is not ready.")
    limit: float | None = Field(
        default=None, description="The limit that was exceeded (bytes, files, pixels, seconds)."
    )
    setting: str | None = Field(default=None, description="The setting that holds the limit.")
    top_k: int | None = Field(default=None, description="The top_k asked for.")
    num_classes: int | None = Field(default=None, description="The model's number of classes.")
    target: str | None = Field(default=None, description="The class asked for (explain).")
    classes: list[str] | None = Field(default=None, description="The model's class names.")
    files: list[FileRejection] | None = Field(
        default=None, description="Per file, why it could not be used (no_usable_image)."
    )
    problems: list[Problem] | None = Field(
        default=None, description="Every invalid parameter (invalid_request)."
    )


class ErrorBody(Answer):
    code: str = Field(description="Machine-readable error code, e.g. 'unknown_model'.")
    message: str = Field(description="What was wrong, naming the field, file or limit.")
    details: ErrorDetails | None = Field(
        default=None, description="Structured context (per-file errors, limits, states)."
    )


class ErrorResponse(Answer):
    """The body of every error response."""

    error: ErrorBody


class ProtocolErrorResponse(BaseModel):
    """The body of every error on /v2 (the Open Inference Protocol's error shape)."""

    error: str = Field(description="What was wrong, naming the input, element or limit.")


PROTOCOL_PREFIX = "/v2"


def is_protocol_request(request: Request) -> bool:
    """Whether the request is for a /v2 route (the path below any root_path)."""
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")


class ServiceError(Exception):
    """A failure with an HTTP status, a stable code and a precise message."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.details = details
        self.headers = headers or {}


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(ServiceError):
    status_code = 422
    code = "unprocessable"


class Unavailable(ServiceError):
    """503: the request may succeed later; always carries Retry-After."""

    status_code = 503
    code = "unavailable"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: float = 1.0,
        details: dict[str, Any] | None = None,
    ) -> None:
        retry = str(max(1, math.ceil(retry_after_s)))
        super().__init__(message, code=code, details=details, headers={"Retry-After": retry})


def _respond(
    request: Request,
    status_code: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if is_protocol_request(request):
        # The protocol answers a request it cannot use 400 (the registry's invalid_version
        # is 422 on /v1), and /v2's document names no 422.
        status = 400 if status_code == 422 else status_code
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status_code, headers=headers)


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        problems.append({"field": loc, "problem": str(err.get("msg", "invalid"))})
    text = "; ".join(f"{p['field']}: {p['problem']}" for p in problems) or "invalid request"
    return text, problems


def service_error_response(request: Request, exc: ServiceError) -> JSONResponse:
    """The answer to ``exc`` in the shape the request's API speaks (/v1 or /v2)."""
    return _respond(request, exc.status_code, exc.code, exc.message, exc.details, exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the one JSON error shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        text, problems = _validation_message(exc)
        return _respond(request, 422, "invalid_request", text, {"problems": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs"
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return _respond(request, exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _respond(request, 500, "internal_error", "internal error; see the service log")


def _allowed_methods(request: Request) -> str:
    """Every method some route answers on this path. Starlette names only the methods of
    the first route that matched the path, and admin routes share paths (PUT and DELETE)."""
    scope = request.scope
    allowed = {
        method
        for method in _METHODS
        for route in request.app.router.routes
        # A fresh scope: the request's carries the routing state of the route that failed.
        if route.matches(
            {
                "type": "http",
                "method": method,
                "path": scope["path"],
                "root_path": scope.get("root_path", ""),
            }
        )[0]
        is Match.FULL
    }
    if "GET" in allowed:
        allowed.add("HEAD")  # app.head.HeadAsGet answers it
    return ", ".join(sorted(allowed))


# What each status means, naming every code it carries: the OpenAPI document's error
# responses (generated clients and /docs show them) and the README's error table agree
# with app/'s sources (tests/app/test_errors.py reads the codes from them).
ERROR_STATUS_DOCS: dict[int, str] = {
    400: "Malformed request: `malformed_multipart` (a truncated body, a missing boundary or "
    "Content-Disposition), `bad_content_length`, `bad_request` (an admin request body that "
    "is not UTF-8).",
    401: "`unauthorized`: no bearer token. Carries WWW-Authenticate: Bearer.",
    403: "`invalid_token`: not the admin token; `admin_disabled`: WASTE_ADMIN_TOKEN is unset.",
    404: "`unknown_model`, `unknown_version` or `unknown_alias`.",
    408: "`body_timeout`: the body did not arrive in full within WASTE_BODY_TIMEOUT_S.",
    409: "The request conflicts with the repository's state: `repository_not_writable` (a "
    "read-only repository), `nothing_to_serve` (the change would leave a model nothing to "
    "serve) or `aliases_unreadable` (aliases.json cannot be read); ?force=true overrides the "
    "last two.",
    413: "Over a limit: `request_too_large`, `file_too_large`, `too_many_files`, "
    "`image_too_large` (pixels, WASTE_MAX_IMAGE_PIXELS), `filename_too_long`, "
    "`part_header_too_large`. details name the limit and its setting.",
    415: "`unsupported_media_type`: not multipart/form-data; `unsupported_image_type`: a file "
    "that is no supported image.",
    422: "Invalid parameter or content: `invalid_request` (details.problems names each "
    "parameter), `invalid_version` (no version number, 'latest' or alias name), "
    "`invalid_alias`, `invalid_top_k`, `unknown_class`, `load_failed`, `no_files`, "
    "`empty_file`, `undecodable_image`, `no_usable_image` (none of the files could be used; "
    "details.files says why, per file).",
    503: "The request may succeed later, after Retry-After seconds: `not_ready`, "
    "`no_ready_version`, `version_loading`, `version_failed`, `version_not_loaded`, "
    "`version_unloaded`, `alias_target_missing`, `aliases_unreadable`, `overloaded` (queue "
    "full), `explain_busy`, `upload_memory_full` (WASTE_MAX_UPLOAD_MEMORY_BYTES held by "
    "uploads in progress), `timeout`, `shutting_down`.",
}
# Codes no operation documents by status: the generic code of each status (where no
# specific one applies), 405, 500 and 499 (never sent). Named in the document's description.
GENERAL_ERRORS = (
    "A method a path does not answer gets 405 `method_not_allowed` with an Allow header; an "
    "unexpected failure 500 `internal_error`, without any trace. Where no more specific code "
    "applies, an error carries its status's generic code: `bad_request`, `unauthorized`, "
    "`forbidden`, `not_found`, `conflict`, `payload_too_large`, `unsupported_media_type`, "
    "`unprocessable`, `unavailable`. A request whose client went away before its answer is "
    "counted in the metrics as 499 `client_disconnected`, never sent."
)
_HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    401: {
        "WWW-Authenticate": {
            "description": "Bearer: the scheme the admin routes take.",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
        }
    },
}


def _documented(model: type[BaseModel], status: int, description: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": model, "description": description}
    if status in _HEADERS:
        entry["headers"] = _HEADERS[status]
    return entry


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for each status.

    Routes with parameters or a body list 422: FastAPI would otherwise document its own
    HTTPValidationError there, a shape this service never sends.
    """
    return {
        status: _documented(ErrorResponse, status, ERROR_STATUS_DOCS[status]) for status in statuses
    }


PROTOCOL_STATUS_DOCS: dict[int, str] = {
    400: "Bad request: an invalid inference request or tensor (wrong name, datatype, shape "
    "or size, undecodable image, binary data that does not add up, a malformed version or "
    "Inference-Header-Content-Length).",
    404: "Unknown model or version.",
    413: "Over a limit (request bytes, bytes per image, images per request, pixels).",
    415: "A compressed request body (Content-Encoding), which is not supported.",
    503: "Not ready, version loading/failed/not loaded, queue full or timed out. "
    "Carries Retry-After.",
}


def protocol_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for /v2 routes: the protocol's error shape."""
    responses: dict[int | str, dict[str, Any]] = {
        status: _documented(ProtocolErrorResponse, status, PROTOCOL_STATUS_DOCS[status])
        for status in statuses
    }
    # Also stands in for FastAPI's generated 422: /v2 answers a request it cannot parse 400.
    responses["default"] = {
        "model": ProtocolErrorResponse,
        "description": "Any other error (an unexpected one is a 500), in the same shape.",
    }
    return responses
