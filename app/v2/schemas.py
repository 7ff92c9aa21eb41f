"""Request and response bodies of the Open Inference Protocol's REST API, as we speak it.

The inference request is parsed from the JSON part of the body by :mod:`app.v2.codec`
(never by FastAPI: with the binary tensor data extension the body is JSON followed by raw
bytes). Parameters the protocol leaves open are kept (``extra="allow"``) and ignored
unless listed here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

Dimension = Annotated[StrictInt, Field(ge=0)]


class ServerLive(BaseModel):
    live: bool = True


class ServerReady(BaseModel):
    ready: bool = True


class ModelReady(BaseModel):
    name: str
    ready: bool = True


class ServerMetadataResponse(BaseModel):
    name: str = Field(description="The server's name.")
    version: str = Field(description="The server's version.")
    extensions: list[str] = Field(
        description="Protocol extensions supported: binary_tensor_data, classification."
    )


class MetadataTensor(BaseModel):
    name: str
    datatype: Literal["BYTES", "FP32"]
    shape: list[int] = Field(description="-1 for a dimension of any size (the batch).")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] = Field(description="Every version in the model repository.")
    platform: str = Field(
        description="pytorch_libtorch or onnxruntime_onnx: the backend serving the version "
        "(pytorch_libtorch, its weights' format, while it is not loaded)."
    )
    inputs: list[MetadataTensor] = Field(
        description="A request sends exactly one of them: 'images' (BYTES, encoded image "
        "files) or 'input' (FP32, the normalised network input)."
    )
    outputs: list[MetadataTensor]


class InputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None,
        description="Binary tensor data extension: the tensor's bytes follow the JSON object.",
    )


class RequestInput(BaseModel):
    name: str = Field(description="'images' or 'input'.")
    shape: list[Dimension] = Field(description="[N] for images; [N, 3, H, W] for input.")
    datatype: str = Field(description="BYTES for images; FP32 for input.")
    parameters: InputParameters | None = None
    data: list[Any] | None = Field(
        default=None,
        description="The elements, row-major (flat or nested): base64 strings for BYTES, "
        "numbers for FP32. Absent when binary_data_size is given.",
    )


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data: StrictBool | None = Field(
        default=None, description="Return this output as binary data after the JSON object."
    )
    classification: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None,
        description="Classification extension: return the top k classes per image as BYTES "
        "'probability:index:label' instead of the probabilities.",
    )


class RequestOutput(BaseModel):
    name: str = Field(description="'probabilities'.")
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_output: StrictBool | None = Field(
        default=None, description="Return every output as binary data unless it says otherwise."
    )


class InferenceRequest(BaseModel):
    id: str | None = Field(default=None, description="Returned unchanged in the response.")
    parameters: RequestParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(
        default=None, description="Absent or empty: every output, as JSON."
    )


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32", "BYTES"]
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size when the data follows the JSON object."
    )
    data: list[Any] | None = Field(
        default=None, description="Row-major elements (absent for binary outputs)."
    )


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(
        description="backend and precision: what answered (as on /v1)."
    )
    outputs: list[ResponseOutput]
