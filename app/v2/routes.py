"""HTTP routes of the Open Inference Protocol: thin wrappers over :class:`OpenInference`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from pydantic import BaseModel

from app.errors import protocol_error_responses
from app.params import ModelName, VersionSpec
from app.service import Service, service_from
from app.v2 import codec
from app.v2.schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadataResponse,
    ModelReady,
    ServerLive,
    ServerMetadataResponse,
    ServerReady,
)
from app.v2.service import OpenInference

TAG = "open inference protocol (v2)"


async def _protocol(service: Annotated[Service, Depends(service_from)]) -> OpenInference:
    return service.open_inference


Protocol = Annotated[OpenInference, Depends(_protocol)]
HeaderLength = Annotated[
    str | None,
    Header(
        alias=codec.HEADER_LENGTH,
        description="Binary tensor data extension: the length of the JSON object that "
        "starts the body; the inputs' raw bytes follow it.",
    ),
]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` substituted, for an ``openapi_extra`` body
    (FastAPI cannot document a body it does not parse, and the binary extension's body is
    not JSON)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_BINARY = {
    "schema": {"type": "string", "format": "binary"},
    "description": "The JSON object, then each binary tensor's bytes (binary tensor data "
    "extension; the Inference-Header-Content-Length header gives the JSON's length).",
}
_INFER: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(InferenceRequest)},
                "application/octet-stream": _BINARY,
            },
        }
    },
    "response_model": InferenceResponse,
    "responses": {
        200: {"content": {"application/octet-stream": _BINARY}},
        **protocol_error_responses(400, 404, 413, 415, 503),
    },
    "tags": [TAG],
}
_METADATA_ERRORS = protocol_error_responses(404, 503)

router = APIRouter(prefix="/v2")


@router.get("/health/live", tags=[TAG], response_model=ServerLive)
async def server_live() -> ServerLive:
    """The process is up. Never depends on models."""
    return ServerLive()


@router.get(
    "/health/ready",
    tags=[TAG],
    response_model=ServerReady,
    responses=protocol_error_responses(503),
)
async def server_ready(protocol: Protocol) -> ServerReady:
    """200 when every model's default version can answer (as /health/ready); else 503."""
    return protocol.server_ready()


@router.get("", tags=[TAG], response_model=ServerMetadataResponse)
async def server_metadata(protocol: Protocol) -> ServerMetadataResponse:
    """Server name, version and the protocol extensions it supports."""
    return protocol.server_metadata()


@router.get(
    "/models/{name}", tags=[TAG], response_model=ModelMetadataResponse, responses=_METADATA_ERRORS
)
async def model_metadata(name: ModelName, protocol: Protocol) -> ModelMetadataResponse:
    """Inputs, outputs and versions of the model's default version."""
    return await protocol.model_metadata(name, None)


@router.get(
    "/models/{name}/versions/{version}",
    tags=[TAG],
    response_model=ModelMetadataResponse,
    responses=_METADATA_ERRORS,
)
async def version_metadata(
    name: ModelName, version: VersionSpec, protocol: Protocol
) -> ModelMetadataResponse:
    """Inputs, outputs and versions of a version (number, 'latest' or alias), in any state."""
    return await protocol.model_metadata(name, version)


@router.get(
    "/models/{name}/ready", tags=[TAG], response_model=ModelReady, responses=_METADATA_ERRORS
)
async def model_ready(name: ModelName, protocol: Protocol) -> ModelReady:
    """200 when the model's default version can answer; 503 with the reason."""
    return protocol.model_ready(name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    tags=[TAG],
    response_model=ModelReady,
    responses=_METADATA_ERRORS,
)
async def version_ready(name: ModelName, version: VersionSpec, protocol: Protocol) -> ModelReady:
    """200 when this version can answer; 503 with the reason."""
    return protocol.model_ready(name, version)


@router.post("/models/{name}/infer", **_INFER)
async def infer(
    request: Request, name: ModelName, protocol: Protocol, header_length: HeaderLength = None
) -> Response:
    """Classify a BYTES tensor of encoded images or an FP32 tensor of normalised images
    with the model's default version."""
    return codec.http_response(await protocol.infer(request, name, None, header_length))


@router.post("/models/{name}/versions/{version}/infer", **_INFER)
async def infer_version(
    request: Request,
    name: ModelName,
    version: VersionSpec,
    protocol: Protocol,
    header_length: HeaderLength = None,
) -> Response:
    """Classify with a named version (number, 'latest' or alias)."""
    return codec.http_response(await protocol.infer(request, name, version, header_length))
