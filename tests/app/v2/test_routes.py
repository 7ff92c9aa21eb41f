"""The Open Inference Protocol driven by its official client (tritonclient) over TCP.

Every answer is checked against our own ``/v1`` predict on the same images, on the same
server: same version, same probabilities within 1e-5.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from app.images import decode_image
from tests.app.conftest import MODEL, OTHER, TOKEN, inference_blocked
from tests.app.v2.conftest import LiveServer
from wastenet.classes import CLASS_NAMES
from wastenet.preprocess import normalize
from wastenet.schema import Preprocessing

PREP = Preprocessing(resize_size=36, input_size=32)


def photo(seed: int, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> bytes:
    """Random pixels with a bright block in one corner: a mirrored decode would show."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 3, : size[0] // 4] = (250, 20 * seed % 256, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def photos(seed: int) -> list[bytes]:
    return [photo(seed), photo(seed + 1, "JPEG", (64, 50)), photo(seed + 2, "PNG", (30, 60))]


def v1_probabilities(server: LiveServer, images: list[bytes], version: str) -> np.ndarray:
    """Our own REST API's answer: every class of every image, as a matrix."""
    files = [
        ("files", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)
    ]
    url = f"{server.base}/v1/models/{MODEL}/versions/{version}/predict?top_k=12"
    response = httpx.post(url, files=files, timeout=30)
    assert response.status_code == 200, response.text
    probs = np.zeros((len(images), 12))
    for row, prediction in enumerate(response.json()["predictions"]):
        for score in prediction["top_k"]:
            probs[row, score["class_index"]] = score["confidence"]
    return probs


def bytes_input(images: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:  # JSON carries BYTES as text: base64, as the protocol's image servers do
        encoded = [base64.b64encode(data) for data in images]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    return tensor


def normalised(images: list[bytes]) -> np.ndarray:
    """What the network reads for these files: the service's decode, training's normalise."""
    arrays = [decode_image(data, "x", PREP, 10**8).tensor for data in images]
    return normalize(torch.stack(arrays), PREP).numpy().astype(np.float32)


@pytest.fixture
def client(server: LiveServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url, network_timeout=60)


def status_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), str(info.value.message())


# -- health and metadata -----------------------------------------------------------------
def test_liveness_readiness_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "waste-classifier"
    assert set(metadata["extensions"]) == {"binary_tensor_data", "classification"}


def test_model_metadata_names_the_inputs_outputs_and_versions(
    client: triton.InferenceServerClient,
) -> None:
    metadata = client.get_model_metadata(MODEL)
    assert metadata == {
        "name": MODEL,
        "versions": ["1", "2"],
        "platform": "pytorch_libtorch",
        "inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 12]}],
    }
    assert client.get_model_metadata(MODEL, "1") == metadata
    assert client.get_model_metadata(OTHER)["versions"] == ["1"]


def test_model_readiness_follows_version_selection(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    # v1 is not loaded (v2 is the latest), so it cannot answer: 503 with the reason.
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "2")
    assert client.is_model_ready(MODEL, "latest")
    assert not client.is_model_ready(MODEL, "1")
    response = httpx.get(f"{server.base}/v2/models/{MODEL}/versions/1/ready")
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.json() == {"error": response.json()["error"]}
    assert "is not loaded" in response.json()["error"]
    for path, message in [
        ("/v2/models/nope/ready", "model 'nope' not found"),
        (f"/v2/models/{MODEL}/versions/7/ready", "version 7 of model"),
        (f"/v2/models/{MODEL}/versions/staging", "version 'staging' of model"),
    ]:
        response = httpx.get(server.base + path)
        assert response.status_code == 404
        assert list(response.json()) == ["error"] and message in response.json()["error"]


# -- inference ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 5, 9])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_images_answer_as_v1_does(
    server: LiveServer, client: triton.InferenceServerClient, seed: int, binary: bool
) -> None:
    images = photos(seed)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(
        MODEL, [bytes_input(images, binary)], outputs=[output], request_id=f"r{seed}"
    )
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (
        MODEL,
        "2",
        f"r{seed}",
    )
    assert response["parameters"] == {"backend": "torch", "precision": "fp32"}
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (3, 12)
    expected = v1_probabilities(server, images, "2")
    assert np.abs(probs - expected).max() < 1e-5
    assert np.abs(expected[0] - expected[1]).max() > 1e-4  # the images are told apart


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_preprocessed_fp32_tensor_answers_as_its_images_do(
    server: LiveServer, client: triton.InferenceServerClient, binary: bool
) -> None:
    # Eight images: 98 kB in binary (parsed inline), 490 kB as JSON (on a decode thread).
    images = photos(3) + photos(6) + photos(9)[:2]
    tensor = triton.InferInput("input", [8, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(normalised(images), binary_data=binary)
    result = client.infer(MODEL, [tensor], model_version="latest")
    assert result.get_response()["model_version"] == "2"
    expected = v1_probabilities(server, images, "2")
    assert np.abs(result.as_numpy("probabilities") - expected).max() < 1e-5


def test_versions_are_selected_as_on_v1(make_server: Callable[..., LiveServer]) -> None:
    live = make_server(admin_token=TOKEN)
    response = httpx.put(
        f"{live.base}/v1/admin/models/{MODEL}/aliases/staging",
        json={"version": 1},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    client = triton.InferenceServerClient(live.url, network_timeout=60)
    images = photos(11)
    v1, v2 = v1_probabilities(live, images, "1"), v1_probabilities(live, images, "2")
    assert np.abs(v1 - v2).max() > 1e-3  # different weights: the version really matters
    for spec, version, expected in [
        ("1", "1", v1),
        ("staging", "1", v1),
        ("2", "2", v2),
        ("latest", "2", v2),
        ("", "2", v2),  # none: the default (no 'production' alias, so the latest)
    ]:
        result = client.infer(MODEL, [bytes_input(images, True)], model_version=spec)
        assert result.get_response()["model_version"] == version
        assert np.abs(result.as_numpy("probabilities") - expected).max() < 1e-5


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_classification_extension_returns_the_top_labels(
    server: LiveServer, client: triton.InferenceServerClient, binary: bool
) -> None:
    images = photos(21)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=4)
    result = client.infer(MODEL, [bytes_input(images, binary)], outputs=[output])
    labels = result.as_numpy("probabilities")
    assert labels.shape == (3, 4) and result.get_output("probabilities")["datatype"] == "BYTES"
    expected = v1_probabilities(server, images, "2")
    for row in range(3):
        # tritonclient gives bytes for binary BYTES outputs and str for JSON ones
        parsed = [
            (entry.decode() if isinstance(entry, bytes) else entry).split(":")
            for entry in labels[row]
        ]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-expected[row], kind="stable")[:4])
        assert [name for _, _, name in parsed] == [CLASS_NAMES[i] for i in indices]
        values = [float(value) for value, _, _ in parsed]
        assert values == sorted(values, reverse=True)
        assert np.abs(np.array(values) - expected[row, indices]).max() < 1e-5


# -- one batcher for both protocols ------------------------------------------------------
def batch_sizes(server: LiveServer, version: str) -> dict[str, float]:
    """The waste_batch_size histogram of MODEL ``version``: bucket le -> count, and sum."""
    text = httpx.get(f"{server.base}/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "waste_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") == MODEL and sample.labels.get("version") == version:
                key = sample.labels.get("le", sample.name.rsplit("_", 1)[-1])
                values[key] = sample.value
    return values


def infer_alone(url: str, inputs: list[triton.InferInput]) -> np.ndarray:
    """One request on its own connection (a client per thread, as concurrent callers have)."""
    client = triton.InferenceServerClient(url, network_timeout=60)
    try:
        return np.asarray(client.infer(MODEL, inputs).as_numpy("probabilities"))
    finally:
        client.close()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_v1_and_v2_requests_share_the_versions_batches(
    make_server: Callable[..., LiveServer],
) -> None:
    live = make_server()
    registry = live.service.lifecycle.registry
    assert registry is not None
    served = registry.models[MODEL].versions[2].served
    assert served is not None
    batcher = served.batcher
    images = photos(31)
    expected = v1_probabilities(live, images, "2")
    fp32 = triton.InferInput("input", [1, 3, 32, 32], "FP32")
    fp32.set_data_from_numpy(normalised(images[2:]), binary_data=True)
    before = batch_sizes(live, "2")
    with ThreadPoolExecutor(4) as pool, inference_blocked(live.service):
        # A first request takes the batch that waits for the blocked inference thread ...
        first = pool.submit(infer_alone, live.url, [bytes_input(images[:1], True)])
        wait_for(lambda: batcher.in_flight == 1 and batcher.queue_depth == 0, "a running batch")
        # ... so that three requests, one /v1 and two /v2 of both kinds, queue behind it.
        from_v1 = pool.submit(v1_probabilities, live, images[:1], "2")
        from_bytes = pool.submit(infer_alone, live.url, [bytes_input(images[1:2], False)])
        from_fp32 = pool.submit(infer_alone, live.url, [fp32])
        wait_for(lambda: batcher.queue_depth == 3, "three queued images")
    answers = [first.result(), from_v1.result(), from_bytes.result(), from_fp32.result()]
    for answer, row in zip(answers, [0, 0, 1, 2], strict=True):
        assert np.abs(answer[0] - expected[row]).max() < 1e-5
    after = batch_sizes(live, "2")
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    # Two forward passes: the first request alone, then the three queued ones together.
    assert (delta["count"], delta["sum"]) == (2, 4)
    assert (delta["1.0"], delta["2.0"], delta["4.0"]) == (1, 1, 2)


def test_a_full_queue_answers_503_before_reading_the_body(
    make_server: Callable[..., LiveServer],
) -> None:
    live = make_server(max_files_per_request=2, max_queue_images=2)
    registry = live.service.lifecycle.registry
    assert registry is not None
    served = registry.models[MODEL].versions[2].served
    assert served is not None
    batcher = served.batcher
    two = photos(41)[:2]
    with ThreadPoolExecutor(2) as pool, inference_blocked(live.service):
        running = pool.submit(infer_alone, live.url, [bytes_input(two, True)])
        wait_for(lambda: batcher.in_flight == 2 and batcher.queue_depth == 0, "a running batch")
        queued = pool.submit(infer_alone, live.url, [bytes_input(two, True)])
        wait_for(lambda: batcher.queue_depth == 2, "a full queue")
        client = triton.InferenceServerClient(live.url)
        status, message = status_of(lambda: client.infer(MODEL, [bytes_input(two[:1], True)]))
        assert status == "503" and "at its queue bound" in message
        response = httpx.post(f"{live.base}/v2/models/{MODEL}/infer", content=b"{}")
        assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
        assert list(response.json()) == ["error"]
    assert running.result().shape == queued.result().shape == (2, 12)


# -- errors ------------------------------------------------------------------------------
def tensor(name: str, datatype: str, array: np.ndarray) -> triton.InferInput:
    result = triton.InferInput(name, list(array.shape), datatype)
    result.set_data_from_numpy(array, binary_data=True)
    return result


def _short_fp32() -> list[triton.InferInput]:
    """Data for one image, shape saying two: the sizes do not add up."""
    result = tensor("input", "FP32", np.zeros((1, 3, 32, 32), np.float32))
    return [result.set_shape([2, 3, 32, 32])]


BAD_TENSORS = {
    "wrong datatype": (
        lambda: [tensor("images", "INT32", np.array([7], np.int32))],
        "input 'images' has datatype 'INT32'; it takes BYTES",
    ),
    "FP16 for the network input": (
        lambda: [tensor("input", "FP16", np.zeros((1, 3, 32, 32), np.float16))],
        "input 'input' has datatype 'FP16'; it takes FP32",
    ),
    "wrong image size": (
        lambda: [tensor("input", "FP32", np.zeros((1, 3, 16, 16), np.float32))],
        "must have shape [N, 3, 32, 32]",
    ),
    "channels last": (
        lambda: [tensor("input", "FP32", np.zeros((1, 32, 32, 3), np.float32))],
        "got [1, 32, 32, 3]",
    ),
    "images with a second dimension": (
        lambda: [tensor("images", "BYTES", np.array([[photo(1)]], dtype=np.object_))],
        "input 'images' must have shape [N]",
    ),
    "text instead of an image": (
        lambda: [bytes_input([photo(1), b"just some text"], True)],
        "file 'images[1]' is text, not an image",
    ),
    "a truncated PNG": (
        lambda: [bytes_input([photo(2)[:200]], True)],
        "file 'images[0]' (PNG) cannot be decoded",
    ),
    "an empty element": (lambda: [bytes_input([b""], True)], "file 'images[0]' is empty"),
    "inconsistent sizes": (
        _short_fp32,
        "needs 24576 bytes of FP32 data; binary_data_size gives 12288",
    ),
    "NaN in the network input": (
        lambda: [tensor("input", "FP32", np.full((1, 3, 32, 32), np.nan, np.float32))],
        "input 'input' holds NaN or infinite values",
    ),
    "an unknown input": (
        lambda: [tensor("pixels", "FP32", np.zeros((1, 3, 32, 32), np.float32))],
        "unknown input 'pixels'",
    ),
    "two inputs": (
        lambda: [
            bytes_input([photo(1)], True),
            tensor("input", "FP32", np.zeros((1, 3, 32, 32), np.float32)),
        ],
        "send exactly one input",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_a_bad_tensor_gets_400_with_a_clear_message(
    client: triton.InferenceServerClient, case: str
) -> None:
    make_inputs, message = BAD_TENSORS[case]
    status, text = status_of(lambda: client.infer(MODEL, make_inputs()))
    assert status == "400"
    assert message in text, text


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (triton.InferRequestedOutput("logits"), "unknown output 'logits'"),
        (
            triton.InferRequestedOutput("probabilities", class_count=13),
            "classification 13 is more than the 12 classes",
        ),
    ],
)
def test_a_bad_output_request_gets_400(
    client: triton.InferenceServerClient, output: triton.InferRequestedOutput, message: str
) -> None:
    inputs = [bytes_input([photo(1)], True)]
    status, text = status_of(lambda: client.infer(MODEL, inputs, outputs=[output]))
    assert status == "400" and message in text


def test_unknown_models_and_versions_get_404(client: triton.InferenceServerClient) -> None:
    inputs = [bytes_input([photo(1)], True)]
    assert status_of(lambda: client.infer("nope", inputs)) == (
        "404",
        f"model 'nope' not found (models: {OTHER}, {MODEL})"
        if OTHER < MODEL
        else f"model 'nope' not found (models: {MODEL}, {OTHER})",
    )
    status, text = status_of(lambda: client.infer(MODEL, inputs, model_version="9"))
    assert status == "404" and "version 9 of model" in text
    status, text = status_of(lambda: client.get_model_metadata(MODEL, "staging"))
    assert status == "404" and "aliases: none" in text


def test_a_compressed_body_gets_415(client: triton.InferenceServerClient) -> None:
    inputs = [bytes_input([photo(1)], True)]
    status, text = status_of(
        lambda: client.infer(MODEL, inputs, request_compression_algorithm="gzip")
    )
    assert status == "415" and "Content-Encoding 'gzip' is not supported" in text


def test_a_header_length_that_is_no_ascii_number_gets_400(server: LiveServer) -> None:
    # b"\xb2" is '²' in latin-1: str.isdigit() took it and int() then failed with a 500.
    body = b'{"inputs": []}'
    for value in (b"\xb2", "١٤".encode(), b"9" * 5000):
        response = httpx.post(
            f"{server.base}/v2/models/{MODEL}/infer",
            content=body,
            headers=[(b"Inference-Header-Content-Length", value)],
        )
        assert response.status_code == 400, value
        assert list(response.json()) == ["error"]
        assert "is not a byte count" in response.json()["error"]


def test_the_upload_limits_apply(make_server: Callable[..., LiveServer]) -> None:
    live = make_server(
        max_file_bytes=6000,
        max_request_bytes=20_000,
        max_image_pixels=2500,
        max_files_per_request=3,
    )
    client = triton.InferenceServerClient(live.url)
    noisy = photo(3, "PNG", (52, 52))  # 7.6 kB of noise
    flat = io.BytesIO()
    Image.new("RGB", (60, 60), (10, 200, 30)).save(flat, "PNG")  # 3600 pixels, small file
    small = photo(4, "PNG", (20, 20))
    cases = [
        ([noisy], "over the per-file limit of 6000 bytes (WASTE_MAX_FILE_BYTES)"),
        ([flat.getvalue()], "(WASTE_MAX_IMAGE_PIXELS)"),
        ([small] * 4, "4 images, more than 3 per request (WASTE_MAX_FILES_PER_REQUEST)"),
        ([b"x" * 7000] * 3, "over the limit of 20000 bytes (WASTE_MAX_REQUEST_BYTES)"),
    ]
    for images, message in cases:
        status, text = status_of(
            lambda images=images: client.infer(MODEL, [bytes_input(images, True)])
        )
        assert (status, message in text) == ("413", True), text
    assert client.infer(MODEL, [bytes_input([small] * 3, True)]).as_numpy(
        "probabilities"
    ).shape == (3, 12)


def test_server_readiness_is_503_with_the_reason(make_server: Callable[..., LiveServer]) -> None:
    live = make_server(default_model="ghost")
    assert not triton.InferenceServerClient(live.url).is_server_ready()
    response = httpx.get(f"{live.base}/v2/health/ready")
    assert response.status_code == 503
    assert "the default model 'ghost' is not in the model repository" in response.json()["error"]


def test_errors_on_v2_have_the_protocols_shape_and_v1_keeps_its_own(server: LiveServer) -> None:
    for method, path, status, message in [
        ("POST", f"/v2/models/{MODEL}/infer", 400, "invalid inference request"),
        ("GET", f"/v2/models/{MODEL}/infer", 405, "method GET is not allowed"),
        ("GET", "/v2/nothing", 404, "no route GET /v2/nothing"),
    ]:
        response = httpx.request(method, server.base + path, content=b"not json")
        assert response.status_code == status
        assert list(response.json()) == ["error"] and message in response.json()["error"]
    response = httpx.get(f"{server.base}/v1/nothing")
    assert response.json()["error"]["code"] == "not_found"


def test_v2_requests_are_counted_like_v1_requests(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    def count(model: str, version: str, status: str) -> float:
        for family in text_string_to_metric_families(httpx.get(f"{server.base}/metrics").text):
            for sample in family.samples:
                if sample.name == "waste_requests_total" and sample.labels == {
                    "model": model,
                    "version": version,
                    "status": status,
                }:
                    return sample.value
        return 0.0

    keys = [(MODEL, "2", "200"), (MODEL, "2", "400"), ("unknown", "none", "404")]
    before = [count(*key) for key in keys]
    client.infer(MODEL, [bytes_input([photo(1)], True)])
    status_of(lambda: client.infer(MODEL, [bytes_input([b"text"], True)]))
    status_of(lambda: client.infer("made-up", [bytes_input([photo(1)], True)]))
    assert [count(*key) - b for key, b in zip(keys, before, strict=True)] == [1, 1, 1]


def test_the_openapi_document_covers_v2(server: LiveServer) -> None:
    spec = httpx.get(f"{server.base}/openapi.json").json()
    paths = spec["paths"]
    assert {p for p in paths if p.startswith("/v2")} == {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/versions/{version}/ready",
        "/v2/models/{name}/versions/{version}/infer",
    }
    infer = paths["/v2/models/{name}/versions/{version}/infer"]["post"]
    body = infer["requestBody"]["content"]
    request_input = body["application/json"]["schema"]["properties"]["inputs"]["items"]
    assert {"name", "shape", "datatype", "data", "parameters"} <= set(request_input["properties"])
    assert body["application/octet-stream"]["schema"]["format"] == "binary"
    ok = infer["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/InferenceResponse")
    assert "application/octet-stream" in ok
    for operations in (paths[p] for p in paths if p.startswith("/v2")):
        for operation in operations.values():
            assert "422" not in operation["responses"]  # /v2 answers 400, never 422
            for status, response in operation["responses"].items():
                if status != "200":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith("/ProtocolErrorResponse")
    schemas = spec["components"]["schemas"]
    assert "class_names" in schemas["ModelMetadata"]["required"]  # /v1's, not renamed
    assert {"inputs", "outputs", "versions"} <= set(schemas["ModelMetadataResponse"]["properties"])


def test_a_request_past_its_timeout_gets_503(make_server: Callable[..., LiveServer]) -> None:
    live = make_server(request_timeout_s=0.3)
    client = triton.InferenceServerClient(live.url, network_timeout=30)
    with inference_blocked(live.service):
        status, text = status_of(lambda: client.infer(MODEL, [bytes_input([photo(1)], True)]))
    assert status == "503" and "did not answer within 0.3 s (WASTE_REQUEST_TIMEOUT_S)" in text
    # The batcher goes on serving.
    assert client.infer(MODEL, [bytes_input([photo(1)], True)]).as_numpy("probabilities").shape == (
        1,
        12,
    )
