"""The wire format without a server: request bodies the client would never build, and our
answers read back by the official client's own decoder."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest
from tritonclient.http import InferResult

from app.errors import BadRequest, PayloadTooLarge, ServiceError
from app.tensor_prediction import EncodedImages, NormalisedBatch
from app.uploads import UploadLimits
from app.v2 import codec
from app.v2.schemas import InferenceResponse

LIMITS = UploadLimits(max_request_bytes=1 << 20, max_file_bytes=1000, max_files=4)
SIZE, CLASSES = 4, 12


def body(request: dict[str, Any], *chunks: bytes) -> tuple[bytes, str | None]:
    header = json.dumps(request).encode()
    return header + b"".join(chunks), str(len(header)) if chunks else None


def parse(
    request: dict[str, Any], *chunks: bytes, length: str | None = "auto"
) -> codec.ParsedRequest:
    data, header_length = body(request, *chunks)
    if length != "auto":
        header_length = length
    return codec.parse_request(data, header_length, SIZE, CLASSES, LIMITS)


def failure(request: dict[str, Any], *chunks: bytes, length: str | None = "auto") -> ServiceError:
    with pytest.raises(ServiceError) as info:
        parse(request, *chunks, length=length)
    return info.value


def images_input(n: int, **extra: Any) -> dict[str, Any]:
    return {"name": "images", "shape": [n], "datatype": "BYTES", **extra}


def fp32_input(n: int, **extra: Any) -> dict[str, Any]:
    return {"name": "input", "shape": [n, 3, SIZE, SIZE], "datatype": "FP32", **extra}


def length_prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# -- inputs ------------------------------------------------------------------------------
def test_binary_bytes_elements_are_split_by_their_length_prefixes() -> None:
    raw = length_prefixed(b"first", b"", b"\xff\xd8third")
    parsed = parse({"inputs": [images_input(3, parameters={"binary_data_size": len(raw)})]}, raw)
    assert isinstance(parsed.batch, EncodedImages)
    assert list(parsed.batch.data) == [b"first", b"", b"\xff\xd8third"]
    assert list(parsed.batch.names) == ["images[0]", "images[1]", "images[2]"]


def test_json_bytes_elements_are_base64() -> None:
    encoded = [base64.b64encode(b"\x89PNG\x00\xff").decode(), base64.b64encode(b"two").decode()]
    parsed = parse({"inputs": [images_input(2, data=encoded)]})
    assert isinstance(parsed.batch, EncodedImages)
    assert list(parsed.batch.data) == [b"\x89PNG\x00\xff", b"two"]


@pytest.mark.parametrize("nested", [False, True])
def test_fp32_json_data_flat_or_nested_is_row_major(nested: bool) -> None:
    values = np.arange(2 * 3 * SIZE * SIZE, dtype=np.float32).reshape(2, 3, SIZE, SIZE) / 7
    data = values.tolist() if nested else values.ravel().tolist()
    parsed = parse({"inputs": [fp32_input(2, data=data)]})
    assert isinstance(parsed.batch, NormalisedBatch)
    assert parsed.batch.tensor.dtype == np.float32 and parsed.batch.tensor.flags["C_CONTIGUOUS"]
    assert np.array_equal(parsed.batch.tensor, values)


def test_fp32_binary_data_is_little_endian_and_writable() -> None:
    values = np.linspace(-3, 3, 3 * SIZE * SIZE, dtype=np.float32).reshape(1, 3, SIZE, SIZE)
    raw = values.astype("<f4").tobytes()
    data, header_length = body(
        {"inputs": [fp32_input(1, parameters={"binary_data_size": len(raw)})]}, raw
    )
    parsed = codec.parse_request(bytearray(data), header_length, SIZE, CLASSES, LIMITS)
    assert isinstance(parsed.batch, NormalisedBatch)
    assert np.array_equal(parsed.batch.tensor, values)
    assert parsed.batch.tensor.flags["WRITEABLE"]  # torch reads it without a warning or copy


BAD_REQUESTS: dict[str, tuple[dict[str, Any], tuple[bytes, ...], str | None, str]] = {
    "empty body": ({}, (), "auto", "invalid inference request: inputs: Field required"),
    "no inputs": ({"inputs": []}, (), "auto", "inputs: List should have at least 1 item"),
    "negative dimension": (
        {"inputs": [images_input(1) | {"shape": [-1], "data": ["eA=="]}]},
        (),
        "auto",
        "inputs.0.shape.0: Input should be greater than or equal to 0",
    ),
    "classification as text": (
        {
            "inputs": [images_input(1, data=["eA=="])],
            "outputs": [{"name": "probabilities", "parameters": {"classification": "3"}}],
        },
        (),
        "auto",
        "outputs.0.parameters.classification: Input should be a valid integer",
    ),
    "header length past the body": (
        {"inputs": [images_input(1, parameters={"binary_data_size": 5})]},
        (length_prefixed(b"x"),),
        "9999",
        "Inference-Header-Content-Length 9999 does not fit the body",
    ),
    "header length not a number": (
        {"inputs": [images_input(1, data=["eA=="])]},
        (),
        "12a",
        "Inference-Header-Content-Length '12a' is not a byte count",
    ),
    # str.isdigit() took '²' and then int() failed: a 500 for one header byte.
    "header length a superscript digit": (
        {"inputs": [images_input(1, data=["eA=="])]},
        (),
        "²",
        "Inference-Header-Content-Length '²' is not a byte count",
    ),
    "header length in Arabic-Indic digits": (
        {"inputs": [images_input(1, data=["eA=="])]},
        (),
        "١٢",
        "Inference-Header-Content-Length '١٢' is not a byte count",
    ),
    "header length of 5,000 digits": (
        {"inputs": [images_input(1, data=["eA=="])]},
        (),
        "9" * 5000,
        "Inference-Header-Content-Length '99999999999999999999",
    ),
    "binary data without binary_data_size": (
        {"inputs": [images_input(1, data=["eA=="])]},
        (b"trailing",),
        "auto",
        "8 bytes follow the JSON object but input 'images' gives no binary_data_size",
    ),
    "binary_data_size without the header": (
        {"inputs": [images_input(1, parameters={"binary_data_size": 5})]},
        (length_prefixed(b"x"),),
        None,
        "invalid inference request",  # the JSON is followed by bytes it cannot parse
    ),
    "binary_data_size disagrees": (
        {"inputs": [images_input(1, parameters={"binary_data_size": 4})]},
        (length_prefixed(b"x"),),
        "auto",
        "gives binary_data_size 4 but 5 bytes follow the JSON object",
    ),
    "both data and binary": (
        {"inputs": [images_input(1, data=["eA=="], parameters={"binary_data_size": 5})]},
        (length_prefixed(b"x"),),
        "auto",
        "gives both 'data' and binary_data_size",
    ),
    "no data": ({"inputs": [images_input(1)]}, (), "auto", "input 'images' has no data"),
    "a length prefix past the end": (
        {"inputs": [images_input(1, parameters={"binary_data_size": 6})]},
        (struct.pack("<I", 50) + b"ab",),
        "auto",
        "element 0 of input 'images' declares 50 bytes but only 2 remain",
    ),
    "more elements than the shape": (
        {"inputs": [images_input(1, parameters={"binary_data_size": 10})]},
        (length_prefixed(b"a", b"b"),),
        "auto",
        "input 'images' has shape [1] but its binary data holds 1 element(s) and 5 bytes more",
    ),
    "fewer elements than the shape": (
        {"inputs": [images_input(3, parameters={"binary_data_size": 10})]},
        (length_prefixed(b"a", b"b"),),
        "auto",
        "input 'images' has shape [3] but its binary data holds 2 element(s)",
    ),
    "a cut length prefix": (
        {"inputs": [images_input(2, parameters={"binary_data_size": 7})]},
        (length_prefixed(b"a") + b"\x01\x00",),
        "auto",
        "ends inside the length of element 1",
    ),
    "base64 that is not": (
        {"inputs": [images_input(1, data=["not base64!"])]},
        (),
        "auto",
        "element 0 of input 'images' is not base64",
    ),
    "a number for an image": (
        {"inputs": [images_input(1, data=[42])]},
        (),
        "auto",
        "element 0 of input 'images' is a int: in JSON, BYTES elements are base64 strings",
    ),
    "shape and data disagree (JSON)": (
        {"inputs": [images_input(2, data=["eA=="])]},
        (),
        "auto",
        "input 'images' has shape [2] but 1 element(s) of data",
    ),
    "no images": ({"inputs": [images_input(0, data=[])]}, (), "auto", "has no images"),
    "text as FP32": (
        {"inputs": [fp32_input(1, data=["1.0"] * 48)]},
        (),
        "auto",
        "the data of input 'input' must be numbers (FP32)",
    ),
    "booleans as FP32": (
        {"inputs": [fp32_input(1, data=[True] * 48)]},
        (),
        "auto",
        "must be numbers (FP32)",
    ),
    "a ragged list": (
        {"inputs": [fp32_input(1, data=[[1.0, 2.0], [3.0]])]},
        (),
        "auto",
        "the data of input 'input' is a ragged nested list",
    ),
    "too few numbers": (
        {"inputs": [fp32_input(1, data=[0.5] * 47)]},
        (),
        "auto",
        "input 'input' has shape [1, 3, 4, 4] (48 elements) but 47 element(s) of data",
    ),
    "a number too large for FP32": (
        {"inputs": [fp32_input(1, data=[1e300] + [0.0] * 47)]},
        (),
        "auto",
        "input 'input' holds NaN or infinite values",
    ),
    "output asked twice": (
        {
            "inputs": [images_input(1, data=["eA=="])],
            "outputs": [{"name": "probabilities"}, {"name": "probabilities"}],
        },
        (),
        "auto",
        "output 'probabilities' is requested 2 times",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_malformed_request_is_a_400_naming_the_problem(case: str) -> None:
    request, chunks, length, message = BAD_REQUESTS[case]
    error = failure(request, *chunks, length=length)
    assert isinstance(error, BadRequest) and error.status_code == 400
    assert message in error.message, error.message


def test_an_element_over_the_file_limit_is_a_413() -> None:
    encoded = base64.b64encode(b"x" * 1001).decode()
    error = failure({"inputs": [images_input(1, data=[encoded])]})
    assert isinstance(error, PayloadTooLarge) and error.code == "file_too_large"
    assert "element 0 of input 'images' is 1001 bytes" in error.message


# -- outputs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("parameters", "outputs", "expected"),
    [
        (None, None, codec.OutputRequest(None, False)),
        ({"binary_data_output": True}, None, codec.OutputRequest(None, True)),
        (
            {"binary_data_output": True},
            [{"name": "probabilities", "parameters": {"binary_data": False}}],
            codec.OutputRequest(None, False),  # the output's own choice wins
        ),
        (
            None,
            [{"name": "probabilities", "parameters": {"classification": 3, "binary_data": True}}],
            codec.OutputRequest(3, True),
        ),
        ({"priority": 1, "custom": "kept"}, [], codec.OutputRequest(None, False)),
    ],
)
def test_output_requests(
    parameters: dict[str, Any] | None,
    outputs: list[dict[str, Any]] | None,
    expected: codec.OutputRequest,
) -> None:
    request: dict[str, Any] = {"inputs": [images_input(1, data=["eA=="])]}
    if parameters is not None:
        request["parameters"] = parameters
    if outputs is not None:
        request["outputs"] = outputs
    assert parse(request).output == expected


# -- answers, read back by tritonclient --------------------------------------------------
NAMES = [f"class{i}" for i in range(CLASSES)]


def probabilities(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    logits = rng.normal(0, 2, (n, CLASSES))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs.astype(np.float32)


def read_back(result: codec.InferenceAnswer) -> InferResult:
    http = codec.http_response(result)
    header_length = http.headers.get(codec.HEADER_LENGTH)
    return InferResult.from_response_body(
        bytes(http.body), header_length=int(header_length) if header_length else None
    )


def empty_response() -> InferenceResponse:
    return InferenceResponse(
        model_name="m", model_version="3", id="x", parameters={"backend": "torch"}, outputs=[]
    )


@pytest.mark.parametrize("binary", [True, False])
def test_probabilities_round_trip_exactly(binary: bool) -> None:
    probs = probabilities(3)
    result = read_back(
        codec.answer(empty_response(), probs, NAMES, codec.OutputRequest(None, binary))
    )
    assert result.get_response()["model_version"] == "3"
    assert np.array_equal(result.as_numpy("probabilities"), probs)
    output = result.get_output("probabilities")
    assert output["shape"] == [3, CLASSES] and output["datatype"] == "FP32"
    assert ("binary_data_size" in output.get("parameters", {})) is binary


@pytest.mark.parametrize("binary", [True, False])
def test_classification_is_probability_index_label_most_likely_first(binary: bool) -> None:
    probs = probabilities(2)
    probs[1] = 0.0
    probs[1, [7, 2, 9]] = [0.5, 0.25, 0.25]  # a tie: the lower index first, as top-k does
    answer = codec.answer(empty_response(), probs, NAMES, codec.OutputRequest(3, binary))
    labels = read_back(answer).as_numpy("probabilities")
    assert labels.shape == (2, 3)
    rows = [[e.decode() if isinstance(e, bytes) else e for e in row] for row in labels]
    assert rows[1] == ["0.5:7:class7", "0.25:2:class2", "0.25:9:class9"]
    top = np.argsort(-probs[0], kind="stable")[:3]
    assert [r.split(":", 1)[1] for r in rows[0]] == [f"{i}:class{i}" for i in top]
    # The shortest text that reads back as the FP32 output's very value.
    assert [np.float32(r.split(":")[0]) for r in rows[0]] == [probs[0, i] for i in top]
