"""Every read-only endpoint and error path, through TestClient on one running app."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.app.conftest import (
    MODEL,
    OTHER,
    PREPROCESSING,
    files,
    image_bytes,
    link_tree,
    settings_for,
    wait_ready,
)
from tests.app.test_images import bomb_png
from wastenet.artifacts import load_version
from wastenet.classes import CLASS_NAMES
from wastenet.preprocess import eval_transform

ERROR_KEYS = {"code", "message", "details"}


def assert_error(response: object, status: int, code: str, *fragments: str) -> dict[str, object]:
    assert hasattr(response, "status_code") and hasattr(response, "json")
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body["error"]["message"]
    assert "Traceback" not in response.text
    return dict(body["error"])


@pytest.fixture(scope="module")
def api(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    repo = tmp_path_factory.mktemp("api") / "models"
    link_tree(template_repo, repo)
    settings = settings_for(repo, max_request_bytes=200_000, max_file_bytes=100_000)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


JPEG = image_bytes("JPEG")


# -- health ------------------------------------------------------------------------------
def test_liveness_and_readiness(api: TestClient) -> None:
    assert api.get("/health/live").json() == {"status": "alive"}
    ready = api.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": {MODEL: 2, OTHER: 1}, "not_ready": {}}
    assert api.get(f"/health/ready/{OTHER}").json()["models"] == {OTHER: 1}
    assert_error(api.get("/health/ready/nope"), 404, "unknown_model", "'nope'")


# -- models ------------------------------------------------------------------------------
def test_model_list_shows_versions_states_aliases_and_defaults(api: TestClient) -> None:
    body = api.get("/v1/models").json()
    assert body["default_model"] == MODEL
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == {MODEL, OTHER}
    main = models[MODEL]
    assert main["default_version"] == 2 and main["default_selector"] == "latest"
    assert main["aliases"] == {}
    states = {v["version"]: v["state"] for v in main["versions"]}
    assert states == {1: "available", 2: "ready"}  # latest loaded, older not (the rule)
    assert api.get(f"/v1/models/{OTHER}").json()["versions"][0]["state"] == "ready"
    assert_error(api.get("/v1/models/nope"), 404, "unknown_model", "'nope'", MODEL)


def test_version_detail_comes_from_model_json(api: TestClient) -> None:
    for spec in ("2", "latest"):
        body = api.get(f"/v1/models/{MODEL}/versions/{spec}").json()
        assert body["version"] == 2 and body["state"] == "ready"
        meta = body["metadata"]
        assert meta["class_names"] == list(CLASS_NAMES)
        assert meta["architecture"]["arch"] == "resnet18"
        assert meta["architecture"]["cbam"] == "block"
        assert meta["preprocessing"]["input_size"] == 32
        assert meta["evaluation"]["accuracy"] == pytest.approx(0.52)
    not_loaded = api.get(f"/v1/models/{MODEL}/versions/1").json()
    assert not_loaded["state"] == "available"
    assert not_loaded["metadata"]["description"] == "random init, seed 1"
    assert_error(api.get(f"/v1/models/{MODEL}/versions/9"), 404, "unknown_version", "9")
    assert_error(
        api.get(f"/v1/models/{MODEL}/versions/staging"), 404, "unknown_version", "'staging'"
    )


# -- predict -----------------------------------------------------------------------------
def test_predict_default_model_names_model_and_version(api: TestClient) -> None:
    response = api.post("/v1/predict", files=files(("a.jpg", JPEG)), params={"top_k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL and body["version"] == 2
    # No exported file in this version: on CPU, torch fp32 answers.
    assert body["backend"] == "torch" and body["precision"] == "fp32"
    [prediction] = body["predictions"]
    assert prediction["status"] == "ok" and prediction["filename"] == "a.jpg"
    assert prediction["label"] in CLASS_NAMES
    assert CLASS_NAMES[prediction["class_index"]] == prediction["label"]
    top = prediction["top_k"]
    assert len(top) == 5 and top[0]["label"] == prediction["label"]
    confidences = [t["confidence"] for t in top]
    assert confidences == sorted(confidences, reverse=True)
    assert 0.0 < prediction["confidence"] <= 1.0


def test_predictions_equal_the_network_on_trainings_eval_transform(
    api: TestClient, template_repo: Path
) -> None:
    data = image_bytes("PNG", size=(45, 60), color=(30, 160, 90))
    body = api.post(
        f"/v1/models/{MODEL}/predict",
        files=files(("g.png", data)),
        params={"top_k": 12},
    ).json()
    loaded = load_version(template_repo / MODEL / "2")
    x = eval_transform(PREPROCESSING)(Image.open(io.BytesIO(data))).unsqueeze(0)
    with torch.inference_mode():
        expected = loaded.model(x).softmax(dim=1)[0]
    served = {t["class_index"]: t["confidence"] for t in body["predictions"][0]["top_k"]}
    assert len(served) == 12
    for index, probability in served.items():
        assert probability == pytest.approx(float(expected[index]), abs=1e-5)


def test_version_selection_by_number_latest_and_default(api: TestClient) -> None:
    by_number = api.post(f"/v1/models/{MODEL}/versions/2/predict", files=files(("a", JPEG)))
    assert by_number.json()["version"] == 2
    latest = api.post(f"/v1/models/{MODEL}/versions/latest/predict", files=files(("a", JPEG)))
    assert latest.json()["version"] == 2
    other = api.post(f"/v1/models/{OTHER}/predict", files=files(("a", JPEG)))
    assert (other.json()["model"], other.json()["version"]) == (OTHER, 1)


def test_unknown_model_or_version_is_404_and_unloaded_version_is_503(api: TestClient) -> None:
    assert_error(
        api.post("/v1/models/nope/predict", files=files(("a", JPEG))),
        404,
        "unknown_model",
        "'nope'",
    )
    assert_error(
        api.post(f"/v1/models/{MODEL}/versions/7/predict", files=files(("a", JPEG))),
        404,
        "unknown_version",
        "version 7",
        "1, 2",
    )
    assert_error(
        api.post(f"/v1/models/{MODEL}/versions/prod/predict", files=files(("a", JPEG))),
        404,
        "unknown_version",
        "'prod'",
    )
    response = api.post(f"/v1/models/{MODEL}/versions/1/predict", files=files(("a", JPEG)))
    assert_error(response, 503, "version_not_loaded", "v1 is not loaded", "/load")
    assert response.headers["retry-after"].isdigit()


def test_multi_image_request_gives_per_file_results_and_errors(api: TestClient) -> None:
    uploads = files(
        ("one.jpg", JPEG),
        ("notes.txt", b"not an image"),
        ("two.png", image_bytes("PNG", color=(0, 0, 200))),
        ("empty.jpg", b""),
        ("three.webp", image_bytes("WEBP")),
    )
    response = api.post("/v1/predict", files=uploads)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [
        "one.jpg",
        "notes.txt",
        "two.png",
        "empty.jpg",
        "three.webp",
    ]
    assert [p["status"] for p in predictions] == ["ok", "error", "ok", "error", "ok"]
    assert predictions[1]["error"]["code"] == "unsupported_image_type"
    assert set(predictions[1]) == {"status", "filename", "error"}
    assert set(predictions[1]["error"]) == {"code", "message"}  # no "details" per file
    assert set(predictions[0]) == {
        "status",
        "filename",
        "label",
        "class_index",
        "confidence",
        "uncertain",
        "top_k",
    }
    assert predictions[0]["uncertain"] is False  # no min_confidence: never uncertain
    assert predictions[3]["error"]["code"] == "empty_file"
    assert "label" in predictions[4]


@pytest.mark.parametrize(
    ("name", "data", "status", "code", "fragment"),
    [
        ("empty.jpg", b"", 422, "empty_file", "0 bytes"),
        ("notes.txt", b"just text\n", 415, "unsupported_image_type", "text"),
        (
            "cut.jpg",
            image_bytes("JPEG", size=(64, 64), quality=95)[:300],
            422,
            "undecodable_image",
            "cut.jpg",
        ),
        ("bomb.png", bomb_png(60_000, 60_000), 413, "image_too_large", "bomb.png"),
    ],
)
def test_a_single_bad_image_is_a_precise_4xx(
    api: TestClient, name: str, data: bytes, status: int, code: str, fragment: str
) -> None:
    assert_error(api.post("/v1/predict", files=files((name, data))), status, code, fragment)
    assert api.get("/health/live").status_code == 200  # and the service keeps serving
    assert api.post("/v1/predict", files=files(("ok.jpg", JPEG))).status_code == 200


def test_several_bad_images_are_refused_with_each_reason(api: TestClient) -> None:
    response = api.post("/v1/predict", files=files(("a.txt", b"abc"), ("b.jpg", b"")))
    error = assert_error(response, 422, "no_usable_image", "none of the 2 files", "a.txt")
    details = error["details"]
    assert isinstance(details, dict)
    assert [f["code"] for f in details["files"]] == ["unsupported_image_type", "empty_file"]


def test_wrong_request_types(api: TestClient) -> None:
    assert_error(
        api.post("/v1/predict", json={"image": "x"}),
        415,
        "unsupported_media_type",
        "application/json",
    )
    assert_error(api.post("/v1/predict"), 415, "unsupported_media_type", "no Content-Type")
    assert_error(
        api.post("/v1/predict", data={"image": "x"}, files=files()),
        415,
        "unsupported_media_type",
    )
    assert_error(
        api.post("/v1/predict", files=[("image", ("a.jpg", JPEG, "image/jpeg"))]),
        422,
        "no_files",
        "'files'",
        "'image'",
    )
    assert_error(
        api.post("/v1/predict", files=files(("a", JPEG)), params={"top_k": "many"}),
        422,
        "invalid_request",
        "top_k",
    )
    assert_error(
        api.post("/v1/predict", files=files(("a", JPEG)), params={"top_k": 13}),
        422,
        "invalid_top_k",
        "12 classes",
    )
    assert_error(api.get("/v1/predict"), 405, "method_not_allowed", "GET")
    assert_error(api.get("/v3/nothing"), 404, "not_found", "/v3/nothing")  # /v2: its own shape


def test_malformed_multipart(api: TestClient) -> None:
    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    truncated = (
        b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
        + JPEG[:100]
    )
    assert_error(
        api.post("/v1/predict", content=truncated, headers=headers),
        400,
        "malformed_multipart",
        "closing boundary",
    )
    assert_error(
        api.post("/v1/predict", content=b"garbage that is not multipart", headers=headers),
        400,
        "malformed_multipart",
    )
    no_disposition = b"--XyZ\r\nContent-Type: image/jpeg\r\n\r\nabc\r\n--XyZ--\r\n"
    assert_error(
        api.post("/v1/predict", content=no_disposition, headers=headers),
        400,
        "malformed_multipart",
        "Content-Disposition",
    )
    assert_error(
        api.post(
            "/v1/predict",
            content=b"x",
            headers={"content-type": "multipart/form-data"},
        ),
        400,
        "malformed_multipart",
        "boundary",
    )


def test_upload_limits_are_413(api: TestClient) -> None:
    big = b"\xff\xd8" + b"\x00" * 150_000
    response = api.post("/v1/predict", files=files(("big.jpg", big)))
    assert_error(response, 413, "file_too_large", "big.jpg", "WASTE_MAX_FILE_BYTES")
    assert response.headers["connection"] == "close"
    two = files(("a.jpg", b"\x00" * 90_000), ("b.jpg", b"\x00" * 90_000), ("c", b"\x00" * 90_000))
    assert_error(
        api.post("/v1/predict", files=two), 413, "request_too_large", "WASTE_MAX_REQUEST_BYTES"
    )
    many = files(*[(f"{i}.jpg", JPEG) for i in range(9)])
    assert_error(
        api.post("/v1/predict", files=many), 413, "too_many_files", "8", "FILES_PER_REQUEST"
    )

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'--XyZ\r\nContent-Disposition: form-data; name="notes"\r\n\r\n'
        for _ in range(30):
            yield b"\x00" * 10_000

    assert_error(
        api.post(
            "/v1/predict",
            content=chunked(),
            headers={"content-type": "multipart/form-data; boundary=XyZ"},
        ),
        413,
        "request_too_large",
        "WASTE_MAX_REQUEST_BYTES",
    )


# -- metrics and OpenAPI -----------------------------------------------------------------
def test_metrics_cover_requests_latency_queue_batches_and_rate(api: TestClient) -> None:
    api.post("/v1/predict", files=files(("a.jpg", JPEG), ("b.jpg", JPEG)))
    api.post("/v1/models/nope/predict", files=files(("a.jpg", JPEG)))
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for fragment in [
        f'waste_requests_total{{model="{MODEL}",status="200",version="2"}}',
        'waste_requests_total{model="unknown",status="404",version="none"}',
        f'waste_request_duration_seconds_bucket{{le="0.005",model="{MODEL}",version="2"}}',
        f'waste_queue_wait_seconds_count{{model="{MODEL}",version="2"}}',
        f'waste_batch_size_sum{{model="{MODEL}",version="2"}}',
        f'waste_queue_depth{{model="{MODEL}",version="2"}} 0.0',
        f'waste_images_per_second{{model="{MODEL}",version="2"}}',
        f'waste_images_total{{model="{MODEL}",outcome="predicted",version="2"}}',
        f'waste_model_version_state{{model="{MODEL}",state="available",version="1"}} 1.0',
    ]:
        assert fragment in text, fragment
    rate_line = next(
        line for line in text.splitlines() if line.startswith("waste_images_per_second{")
    )
    assert float(rate_line.split()[-1]) > 0


def test_openapi_documents_every_endpoint_parameter_and_error(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/health/live", "get"),
        ("/health/ready", "get"),
        ("/health/ready/{name}", "get"),
        ("/v1/models", "get"),
        ("/v1/models/{name}", "get"),
        ("/v1/models/{name}/versions/{version}", "get"),
        ("/v1/models/{name}/versions/{version}/predict", "post"),
        ("/v1/models/{name}/predict", "post"),
        ("/v1/predict", "post"),
        ("/v1/models/{name}/versions/{version}/explain", "post"),
        ("/v1/models/{name}/explain", "post"),
        ("/v1/explain", "post"),
        ("/metrics", "get"),
        ("/v1/admin/rescan", "post"),
        ("/v1/admin/models/{name}/versions/{version}/load", "post"),
        ("/v1/admin/models/{name}/versions/{version}/unload", "post"),
        ("/v1/admin/models/{name}/aliases/{alias}", "put"),
        ("/v1/admin/models/{name}/aliases/{alias}", "delete"),
    }
    documented = {(p, m) for p, methods in paths.items() for m in methods}
    assert expected <= documented
    predict = paths["/v1/models/{name}/versions/{version}/predict"]["post"]
    body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["items"]["format"] == "binary"
    assert {p["name"] for p in predict["parameters"]} == {
        "name",
        "version",
        "top_k",
        "min_confidence",
    }
    for status in ("400", "404", "413", "415", "422", "503"):
        schema = predict["responses"][status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorResponse")
    assert "PredictResponse" in spec["components"]["schemas"]
    admin = paths["/v1/admin/rescan"]["post"]
    assert {"401", "403"} <= set(admin["responses"]) and admin["security"]
