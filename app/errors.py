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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("app")


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. 'unknown_model'.")
    message: str = Field(description="What was wrong, naming the field, file or limit.")
    details: dict[str, Any] | None = Field(
        default=None, description="Structured context (per-file errors, limits, states)."
    )


class ErrorResponse(BaseModel):
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


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def _respond(
    request: Request,
    status_code: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if is_protocol_request(request):
        return JSONResponse({"error": message}, status_code=status_code, headers=headers)
    return error_response(status_code, code, message, details, headers)


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
        status = 400 if is_protocol_request(request) else 422
        return _respond(request, status, "invalid_request", text, {"problems": problems})

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


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for each status."""
    descriptions = {
        400: "Malformed request: a broken multipart body (malformed_multipart), or an admin "
        "request body that is not UTF-8 (bad_request).",
        401: "Missing bearer token.",
        403: "Wrong bearer token, or admin disabled.",
        404: "Unknown model, version or alias.",
        409: "The request conflicts with the repository's state: a read-only repository "
        "(repository_not_writable), a change that would leave a model nothing to serve "
        "(nothing_to_serve) or an aliases.json that cannot be read (aliases_unreadable); "
        "?force=true overrides the last two.",
        413: "Upload over a limit (request bytes, file bytes, files per request, pixels).",
        415: "Not multipart/form-data, or a file that is not a supported image.",
        422: "Invalid parameter (invalid_request, invalid_version, ...), or no image in the "
        "request could be decoded.",
        503: "Not ready, version loading/failed/not loaded, queue full or timed out. "
        "Carries Retry-After.",
    }
    return {
        status: {"model": ErrorResponse, "description": descriptions.get(status, "Error.")}
        for status in statuses
    }


def protocol_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for /v2 routes: the protocol's error shape."""
    descriptions = {
        400: "Bad request: an invalid inference request or tensor (wrong name, datatype, "
        "shape or size, undecodable image, binary data that does not add up).",
        404: "Unknown model or version.",
        413: "Over a limit (request bytes, bytes per image, images per request, pixels).",
        415: "A compressed request body (Content-Encoding), which is not supported.",
        503: "Not ready, version loading/failed/not loaded, queue full or timed out. "
        "Carries Retry-After.",
    }
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ProtocolErrorResponse, "description": descriptions.get(status, "Error.")}
        for status in statuses
    }
    # Also stands in for FastAPI's generated 422: /v2 answers a request it cannot parse 400.
    responses["default"] = {
        "model": ProtocolErrorResponse,
        "description": "Any other error (an unexpected one is a 500), in the same shape.",
    }
    return responses
