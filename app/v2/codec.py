"""The Open Inference Protocol on the wire: read a request body, parse its tensors, encode
the answer. Pure functions apart from :func:`read_body`; every problem is a
:class:`~app.errors.ServiceError` naming the input, element or limit (400 for a bad
tensor, 413 over a limit), never an unexpected exception.

Binary tensor data extension: with an ``Inference-Header-Content-Length`` header the body
is that many bytes of JSON followed by the raw data of each input that gives
``binary_data_size``, in input order. Raw FP32 data is little-endian, row-major; each BYTES
element is a little-endian uint32 length and then its bytes. In JSON, a BYTES element is a
base64 string: an encoded image is not text, and JSON strings are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from app.tensor_prediction import EncodedImages, NormalisedBatch
from app.uploads import ClientGone, MemoryHold, UploadLimits, body_timeout, check_content_length
from app.v2.schemas import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput

IMAGES = "images"  # BYTES [N]: encoded image files
INPUT = "input"  # FP32 [N, 3, H, W]: the normalised network input (as in model.onnx)
PROBABILITIES = "probabilities"  # FP32 [N, classes]
HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class OutputRequest:
    """How to answer: probabilities, or the top ``classification`` labels; JSON or binary."""

    classification: int | None
    binary: bool


@dataclass(frozen=True)
class ParsedRequest:
    id: str | None
    batch: EncodedImages | NormalisedBatch
    output: OutputRequest


@dataclass(frozen=True)
class InferenceAnswer:
    response: InferenceResponse
    binary: bytes  # the outputs' binary data, in output order (empty: JSON only)


def _mib(n: int) -> str:
    return f"{n / 1_048_576:.1f} MiB" if n >= 1_048_576 else f"{n} bytes"


# -- reading -----------------------------------------------------------------------------
async def read_body(
    request: Request, limits: UploadLimits, memory: MemoryHold | None = None
) -> bytearray:
    """The whole body, refused (413) as soon as it is over the request limit, (408) when
    it does not arrive within ``limits.body_timeout_s``, and (503) when ``memory`` cannot
    cover it.

    A bytearray: FP32 data is then used in place (a writable buffer), without a copy.
    """
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed",
            code="unsupported_content_encoding",
        )
    check_content_length(request, limits)
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            chunks = await _chunks(request, limits, memory)
    except TimeoutError:
        raise body_timeout(limits.body_timeout_s) from None
    except ClientDisconnect:
        raise ClientGone("the client disconnected before the body was complete") from None
    return bytearray().join(chunks)


async def _chunks(request: Request, limits: UploadLimits, memory: MemoryHold | None) -> list[bytes]:
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limits.max_request_bytes:
            error = PayloadTooLarge(
                f"request body is over the limit of {_mib(limits.max_request_bytes)} "
                "(WASTE_MAX_REQUEST_BYTES)",
                code="request_too_large",
            )
            error.headers["Connection"] = "close"  # stop a client that keeps sending
            raise error
        if memory is not None:
            memory.cover(received)
        chunks.append(chunk)
    return chunks


def parse_request(
    body: bytes | bytearray,
    header_length: str | None,
    input_size: int,
    num_classes: int,
    limits: UploadLimits,
) -> ParsedRequest:
    """The request's one input as a batch, and how to answer; 400/413 naming the problem."""
    header, binary = _split(body, header_length)
    request = _validate(header)
    if len(request.inputs) != 1:
        names = ", ".join(repr(i.name) for i in request.inputs)
        raise _bad(f"send exactly one input, {IMAGES!r} or {INPUT!r}; got {names}")
    tensor = request.inputs[0]
    chunk = _binary_data(tensor, binary)
    if tensor.name == IMAGES:
        batch: EncodedImages | NormalisedBatch = _images(tensor, chunk, limits)
    elif tensor.name == INPUT:
        batch = _normalised(tensor, chunk, input_size, limits)
    else:
        raise _bad(
            f"unknown input {tensor.name!r}: this model takes {IMAGES!r} (BYTES [N], encoded "
            f"images) or {INPUT!r} (FP32 [N, 3, {input_size}, {input_size}], normalised)"
        )
    return ParsedRequest(request.id, batch, _output(request, num_classes))


def _bad(message: str, code: str = "invalid_tensor") -> BadRequest:
    return BadRequest(message, code=code)


MAX_HEADER_LENGTH_DIGITS = 15  # a byte count under a petabyte; longer cannot fit a body


def _split(
    body: bytes | bytearray, header_length: str | None
) -> tuple[bytes | bytearray, memoryview]:
    view = memoryview(body)
    if header_length is None:
        return body, view[len(body) :]
    text = header_length.strip()
    # ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and '١'.
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_HEADER_LENGTH_DIGITS):
        shown = header_length[:20] + ("..." if len(header_length) > 20 else "")
        raise _bad(f"{HEADER_LENGTH} {shown!r} is not a byte count", "bad_header_length")
    size = int(text)
    if not 0 < size <= len(body):
        raise _bad(
            f"{HEADER_LENGTH} {size} does not fit the body of {len(body)} bytes",
            "bad_header_length",
        )
    return body[:size], view[size:]


def _validate(header: bytes | bytearray) -> InferenceRequest:
    if not header.strip():
        raise _bad("empty request body: send an inference request (JSON)", "invalid_request")
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {err['msg']}")
        raise _bad("invalid inference request: " + "; ".join(problems), "invalid_request") from None


def _binary_data(tensor: RequestInput, binary: memoryview) -> memoryview | None:
    """The input's raw bytes when it uses the binary extension, else None (JSON data)."""
    size = tensor.parameters.binary_data_size if tensor.parameters else None
    if size is None:
        if len(binary):
            raise _bad(
                f"{len(binary)} bytes follow the JSON object but input {tensor.name!r} gives "
                "no binary_data_size",
                "inconsistent_sizes",
            )
        if tensor.data is None:
            raise _bad(
                f"input {tensor.name!r} has no data: give 'data', or its bytes after the "
                f"JSON object with binary_data_size and the {HEADER_LENGTH} header"
            )
        return None
    if tensor.data is not None:
        raise _bad(f"input {tensor.name!r} gives both 'data' and binary_data_size")
    if size != len(binary):
        raise _bad(
            f"input {tensor.name!r} gives binary_data_size {size} but {len(binary)} bytes "
            f"follow the JSON object ({HEADER_LENGTH} says where it ends)",
            "inconsistent_sizes",
        )
    return binary


def _check_datatype(tensor: RequestInput, datatype: str, what: str) -> None:
    if tensor.datatype != datatype:
        raise _bad(
            f"input {tensor.name!r} has datatype {tensor.datatype!r}; it takes {datatype} ({what})",
            "wrong_datatype",
        )


def _check_count(tensor: RequestInput, n: int, limits: UploadLimits) -> None:
    if n == 0:
        raise _bad(f"input {tensor.name!r} has no images (shape {tensor.shape})")
    if n > limits.max_files:
        raise PayloadTooLarge(
            f"input {tensor.name!r} holds {n} images, more than {limits.max_files} per "
            "request (WASTE_MAX_FILES_PER_REQUEST)",
            code="too_many_files",
        )


# -- inputs ------------------------------------------------------------------------------
def _images(tensor: RequestInput, chunk: memoryview | None, limits: UploadLimits) -> EncodedImages:
    _check_datatype(tensor, "BYTES", "encoded image files")
    if len(tensor.shape) != 1:
        raise _bad(
            f"input {tensor.name!r} must have shape [N] (one encoded image per element), "
            f"got {tensor.shape}",
            "wrong_shape",
        )
    n = tensor.shape[0]
    _check_count(tensor, n, limits)
    if chunk is not None:
        elements = _split_bytes(tensor, chunk, n)
    else:
        assert tensor.data is not None, "_binary_data checked that data is there"
        elements = _base64_elements(tensor, tensor.data, n)
    for index, element in enumerate(elements):
        if len(element) > limits.max_file_bytes:
            raise PayloadTooLarge(
                f"element {index} of input {tensor.name!r} is {_mib(len(element))}, over the "
                f"per-file limit of {_mib(limits.max_file_bytes)} (WASTE_MAX_FILE_BYTES)",
                code="file_too_large",
            )
    return EncodedImages(elements, [f"{tensor.name}[{i}]" for i in range(n)])


def _split_bytes(tensor: RequestInput, chunk: memoryview, n: int) -> list[bytes]:
    """Length-prefixed elements (uint32 little-endian) that must fill ``chunk`` exactly."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(chunk) and len(elements) < n:
        if offset + _LENGTH.size > len(chunk):
            raise _bad(
                f"the binary data of input {tensor.name!r} ends inside the length of element "
                f"{len(elements)}",
                "inconsistent_sizes",
            )
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += _LENGTH.size
        if offset + length > len(chunk):
            raise _bad(
                f"element {len(elements)} of input {tensor.name!r} declares {length} bytes "
                f"but only {len(chunk) - offset} remain in its binary data",
                "inconsistent_sizes",
            )
        elements.append(bytes(chunk[offset : offset + length]))
        offset += length
    if len(elements) != n or offset != len(chunk):
        extra = f" and {len(chunk) - offset} bytes more" if offset != len(chunk) else ""
        raise _bad(
            f"input {tensor.name!r} has shape {tensor.shape} but its binary data holds "
            f"{len(elements)} element(s){extra}",
            "inconsistent_sizes",
        )
    return elements


def _base64_elements(tensor: RequestInput, data: Sequence[Any], n: int) -> list[bytes]:
    if len(data) != n:
        raise _bad(
            f"input {tensor.name!r} has shape {tensor.shape} but {len(data)} element(s) of data",
            "inconsistent_sizes",
        )
    elements = []
    for index, item in enumerate(data):
        if not isinstance(item, str):
            raise _bad(
                f"element {index} of input {tensor.name!r} is a {type(item).__name__}: in "
                "JSON, BYTES elements are base64 strings"
            )
        try:
            elements.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise _bad(
                f"element {index} of input {tensor.name!r} is not base64: in JSON, each "
                "encoded image is a base64 string (or send raw bytes with binary_data_size)",
                "invalid_base64",
            ) from None
    return elements


def _normalised(
    tensor: RequestInput, chunk: memoryview | None, size: int, limits: UploadLimits
) -> NormalisedBatch:
    _check_datatype(tensor, "FP32", "the normalised network input")
    if len(tensor.shape) != 4 or tensor.shape[1:] != [3, size, size]:
        raise _bad(
            f"input {tensor.name!r} must have shape [N, 3, {size}, {size}] (N images at this "
            f"version's input size), got {tensor.shape}",
            "wrong_shape",
        )
    n = tensor.shape[0]
    _check_count(tensor, n, limits)
    count = n * 3 * size * size
    if chunk is not None:
        if len(chunk) != count * 4:
            raise _bad(
                f"input {tensor.name!r} of shape {tensor.shape} needs {count * 4} bytes of FP32 "
                f"data; binary_data_size gives {len(chunk)}",
                "inconsistent_sizes",
            )
        flat = np.frombuffer(chunk, dtype="<f4")
    else:
        assert tensor.data is not None, "_binary_data checked that data is there"
        flat = _json_numbers(tensor, tensor.data, count)
    array = np.ascontiguousarray(flat.reshape(tensor.shape), dtype=np.float32)
    if not np.isfinite(array).all():
        raise _bad(f"input {tensor.name!r} holds NaN or infinite values", "non_finite")
    return NormalisedBatch(array)


def _json_numbers(tensor: RequestInput, data: list[Any], count: int) -> np.ndarray:
    try:
        array = np.asarray(data)
    except ValueError:
        raise _bad(f"the data of input {tensor.name!r} is a ragged nested list") from None
    if array.dtype.kind not in "iuf":
        raise _bad(f"the data of input {tensor.name!r} must be numbers (FP32)", "wrong_datatype")
    if array.size != count:
        raise _bad(
            f"input {tensor.name!r} has shape {tensor.shape} ({count} elements) but "
            f"{array.size} element(s) of data",
            "inconsistent_sizes",
        )
    with np.errstate(over="ignore"):  # out-of-range values become inf: refused by the caller
        return array.astype(np.float32).ravel()


def _output(request: InferenceRequest, num_classes: int) -> OutputRequest:
    params = request.parameters
    binary = bool(params and params.binary_data_output)
    outputs = request.outputs or []
    for output in outputs:
        if output.name != PROBABILITIES:
            raise _bad(
                f"unknown output {output.name!r}: this model has one output, {PROBABILITIES!r}",
                "unknown_output",
            )
    if len(outputs) > 1:
        raise _bad(f"output {PROBABILITIES!r} is requested {len(outputs)} times", "unknown_output")
    if not outputs or outputs[0].parameters is None:
        return OutputRequest(None, binary)
    asked = outputs[0].parameters
    if asked.classification is not None and asked.classification > num_classes:
        raise _bad(
            f"classification {asked.classification} is more than the {num_classes} classes "
            "of this model",
            "invalid_classification",
        )
    if asked.binary_data is not None:
        binary = asked.binary_data
    return OutputRequest(asked.classification, binary)


# -- answering ---------------------------------------------------------------------------
def answer(
    response: InferenceResponse,
    probs: np.ndarray,
    class_names: Sequence[str],
    output: OutputRequest,
) -> InferenceAnswer:
    """``response`` (outputs empty) with its one output: probabilities or top-k labels."""
    n, classes = probs.shape
    labels: list[str] = []
    if output.classification is not None:
        # "probability:index:label", the float32 probability as the FP32 output gives it.
        order = np.argsort(-probs, axis=1, kind="stable")[:, : output.classification]
        labels = [f"{probs[row, i]!s}:{i}:{class_names[i]}" for row in range(n) for i in order[row]]
    shape = [n, output.classification] if labels else [n, classes]
    datatype: Literal["FP32", "BYTES"] = "BYTES" if labels else "FP32"
    raw = b""
    if not output.binary:
        data = labels or probs.ravel().tolist()
        tensor = ResponseOutput(name=PROBABILITIES, shape=shape, datatype=datatype, data=data)
    else:
        if labels:
            raw = b"".join(_LENGTH.pack(len(b)) + b for b in map(str.encode, labels))
        else:
            raw = probs.astype("<f4").tobytes()
        tensor = ResponseOutput(
            name=PROBABILITIES,
            shape=shape,
            datatype=datatype,
            parameters={"binary_data_size": len(raw)},
        )
    return InferenceAnswer(response.model_copy(update={"outputs": [tensor]}), raw)


def http_response(result: InferenceAnswer) -> Response:
    """JSON, or JSON then the binary data with the header giving the JSON's length."""
    header = result.response.model_dump_json(exclude_none=True).encode()
    if not result.binary:
        return Response(header, media_type="application/json")
    return Response(
        header + result.binary,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )
