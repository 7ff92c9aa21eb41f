"""POST .../explain: Grad-CAM and CBAM attention per image, off the prediction path.

The versions here are 96 px (a 3x3 last feature map, so maps have a shape worth checking),
published from randomly initialised networks. Every map the service returns is compared
with :func:`wastenet.explain.explain` run directly on the same image and weights.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

import app.explain as explain_module
from app.explain import Pace, start_explain_pool
from tests.app.conftest import (
    add_version,
    files,
    link_tree,
    publish_random,
    replace_file,
    service_of,
    settings_for,
    wait_ready,
    wait_until,
)
from tests.app.test_api import assert_error
from wastenet.artifacts import load_version
from wastenet.classes import CLASS_NAMES
from wastenet.explain import Explanation, explain, overlay
from wastenet.preprocess import eval_transform, resize_crop, to_rgb
from wastenet.schema import WEIGHTS_FILE, Preprocessing

MODEL = "waste-resnet18-cbam"
PLAIN = "plain-resnet18"
SIZE = 96
PREP = Preprocessing(resize_size=110, input_size=SIZE)
MAP = SIZE // 32  # ResNet's last feature map: 3x3


def publish_sized(repo: Path, name: str, seed: int, cbam: str = "block") -> Path:
    return publish_random(repo, name, seed, cbam, prep=PREP)


def publish_explain_repo(repo: Path) -> Path:
    """MODEL v1, v2 (CBAM, different weights; production -> v1) and PLAIN v1 (no CBAM)."""
    publish_sized(repo, MODEL, seed=11)
    publish_sized(repo, MODEL, seed=12)
    publish_sized(repo, PLAIN, seed=13, cbam="none")
    (repo / MODEL / "aliases.json").write_text(json.dumps({"production": 1}))
    return repo


@pytest.fixture(scope="session")
def explain_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_explain_repo(tmp_path_factory.mktemp("explain") / "models")


@pytest.fixture
def explain_repo(explain_template: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    link_tree(explain_template, repo)
    return repo


@pytest.fixture
def start(explain_repo: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {"default_model": MODEL, "explain_max_files": 3}
        client = TestClient(create_client_app(explain_repo, **(values | overrides)))
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def create_client_app(repo: Path, **overrides: Any) -> Any:
    from app.main import create_app

    return create_app(settings_for(repo, **overrides))


def picture(spot: tuple[int, int], colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    """A dark blue PNG with one bright square: where it sits differs between images."""
    img = Image.new("RGB", size, (20, 30, 90))
    x, y = spot
    ImageDraw.Draw(img).rectangle((x, y, x + 40, y + 40), fill=colour)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


LEFT = picture((5, 5), (250, 230, 40), (130, 110))
RIGHT = picture((80, 60), (40, 250, 120), (130, 110))


def reference(
    repo: Path, name: str, version: int, data: bytes, classes: int | None = None
) -> Explanation:
    """wastenet.explain on the same image and weights, outside the service."""
    model = load_version(repo / name / str(version)).model
    x = eval_transform(PREP)(Image.open(io.BytesIO(data))).unsqueeze(0)
    return explain(model, x, classes)[0]


def png_of(heatmap: dict[str, Any]) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(heatmap["overlay_png"])))
    img.load()
    return img


def post(client: TestClient, path: str, *items: tuple[str, bytes], **params: Any) -> Any:
    return client.post(path, files=files(*items), params=params)


# -- what an explanation holds ---------------------------------------------------------------
def test_maps_are_the_shared_computation_with_png_overlays_of_the_input_size(
    start: Callable[..., TestClient], explain_repo: Path
) -> None:
    client = start()
    response = post(
        client, f"/v1/models/{MODEL}/versions/2/explain", ("l.png", LEFT), ("r.png", RIGHT)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["backend"], body["precision"]) == (
        MODEL,
        2,
        "torch",
        "fp32",
    )
    cams = []
    for item, data in zip(body["explanations"], (LEFT, RIGHT), strict=True):
        ref = reference(explain_repo, MODEL, 2, data)
        assert ref.probabilities is not None and ref.attention is not None
        assert item["input_size"] == SIZE
        assert item["class_index"] == ref.predicted_index == item["target"]["class_index"]
        assert item["label"] == CLASS_NAMES[ref.predicted_index]
        assert item["confidence"] == pytest.approx(float(ref.probabilities.max()), abs=1e-5)
        top = np.argsort(-ref.probabilities, kind="stable")[:3].tolist()
        assert [s["class_index"] for s in item["top_k"]] == top
        for key, expected in (("grad_cam", ref.cam), ("attention", ref.attention)):
            heatmap = item[key]
            values = np.array(heatmap["values"])
            assert (heatmap["height"], heatmap["width"]) == (MAP, MAP) == values.shape
            np.testing.assert_allclose(values, expected, atol=2e-3)
            overlay = png_of(heatmap)
            assert (overlay.format, overlay.size, overlay.mode) == ("PNG", (SIZE, SIZE), "RGB")
        assert np.array(item["grad_cam"]["values"]).max() == pytest.approx(1.0, abs=1e-3)
        cams.append(np.array(item["grad_cam"]["values"]))
    # Two different pictures, two different maps (a constant answer would pass the above
    # only if the reference were constant too).
    assert np.abs(cams[0] - cams[1]).max() > 0.05


def test_overlay_is_the_network_input_blended_with_the_heatmap(
    start: Callable[..., TestClient],
) -> None:
    client = start()
    item = post(client, "/v1/explain", ("l.png", LEFT)).json()["explanations"][0]
    crop = resize_crop(to_rgb(Image.open(io.BytesIO(LEFT))), PREP).permute(1, 2, 0).numpy()
    seen = Image.fromarray(crop, "RGB")  # the 96 px centre crop the network saw
    for key in ("grad_cam", "attention"):
        got = np.asarray(png_of(item[key]), dtype=np.int16)
        expected = np.asarray(overlay(seen, np.array(item[key]["values"])), dtype=np.int16)
        assert np.abs(got - expected).max() <= 3, key
        assert np.abs(got - crop.astype(np.int16)).mean() > 20  # a heatmap is really on it
    # The yellow square is top-left in the crop: the overlay keeps it brighter than the
    # dark blue bottom-right, whatever the heatmap's colours there.
    got = np.asarray(png_of(item["grad_cam"]), dtype=np.float64)
    assert got[2:20, 2:20, 0].mean() > got[-20:, -20:, 0].mean() + 20


def test_requested_class_gets_its_own_grad_cam(
    start: Callable[..., TestClient], explain_repo: Path
) -> None:
    client = start()
    predicted = post(client, "/v1/explain", ("r.png", RIGHT)).json()["explanations"][0]
    other = next(c for c in CLASS_NAMES if c != predicted["label"])
    asked = post(client, "/v1/explain", ("r.png", RIGHT), target=other).json()["explanations"][0]
    index = CLASS_NAMES.index(other)
    ref = reference(explain_repo, MODEL, 1, RIGHT, index)
    assert asked["target"]["label"] == other and asked["target"]["class_index"] == index
    assert asked["target"]["confidence"] == pytest.approx(ref.probability, abs=1e-5)
    assert asked["label"] == predicted["label"]  # the prediction does not change
    np.testing.assert_allclose(np.array(asked["grad_cam"]["values"]), ref.cam, atol=2e-3)
    difference = np.abs(np.array(asked["grad_cam"]["values"]) - predicted["grad_cam"]["values"])
    assert difference.max() > 0.05
    # The attention gate does not depend on the class asked for.
    np.testing.assert_allclose(asked["attention"]["values"], predicted["attention"]["values"])


def test_a_network_without_cbam_has_no_attention_map(start: Callable[..., TestClient]) -> None:
    client = start()
    item = post(client, f"/v1/models/{PLAIN}/explain", ("l.png", LEFT)).json()["explanations"][0]
    assert item["attention"] is None
    assert np.array(item["grad_cam"]["values"]).shape == (MAP, MAP)


# -- selection, like predict ---------------------------------------------------------------------
def test_versions_are_chosen_as_predict_chooses_them(
    start: Callable[..., TestClient], explain_repo: Path
) -> None:
    broken = add_version(explain_repo, MODEL, explain_repo / MODEL / "2")
    replace_file(broken / WEIGHTS_FILE, b"not safetensors")
    client = start()
    image = ("l.png", LEFT)
    answered = {
        path: post(client, path, image).json().get("version")
        for path in (
            "/v1/explain",
            f"/v1/models/{MODEL}/explain",
            f"/v1/models/{MODEL}/versions/production/explain",
            f"/v1/models/{MODEL}/versions/latest/explain",
            f"/v1/models/{MODEL}/versions/2/explain",
        )
    }
    assert list(answered.values()) == [1, 1, 1, 2, 2]
    predicted = post(client, f"/v1/models/{MODEL}/predict", image).json()["version"]
    assert predicted == 1
    assert_error(post(client, "/v1/models/nope/explain", image), 404, "unknown_model", "nope")
    missing = post(client, f"/v1/models/{MODEL}/versions/9/explain", image)
    assert_error(missing, 404, "unknown_version", "9")
    assert_error(
        post(client, f"/v1/models/{MODEL}/versions/01/explain", image), 422, "invalid_version"
    )
    failed = post(client, f"/v1/models/{MODEL}/versions/3/explain", image)
    assert_error(failed, 503, "version_failed", "v3")


def test_the_network_of_a_version_served_by_onnxruntime_is_loaded_once(
    make_client: Callable[..., TestClient], exported_repo: Path
) -> None:
    from tests.app.conftest import MODEL as EXPORTED
    from tests.app.conftest import image_bytes

    client = make_client(model_dir=exported_repo, backend="onnxruntime", precision="fp32")
    service = service_of(client)
    served = service.lifecycle.require_registry().resolve(EXPORTED, "1")[1]
    assert served.model.backend.name == "onnxruntime"
    jpeg = image_bytes("PNG", size=(40, 40), color=(10, 200, 90))
    for _ in range(2):
        response = post(client, f"/v1/models/{EXPORTED}/versions/1/explain", ("a.png", jpeg))
        assert response.status_code == 200, response.text
    assert service.explainer.networks.cached() == [(EXPORTED, 1)]
    item = response.json()["explanations"][0]
    model = load_version(exported_repo / EXPORTED / "1").model
    x = eval_transform(served.model.preprocessing)(Image.open(io.BytesIO(jpeg))).unsqueeze(0)
    ref = explain(model, x)[0]
    assert item["class_index"] == ref.predicted_index
    np.testing.assert_allclose(item["grad_cam"]["values"], ref.cam, atol=2e-3)


# -- errors and limits -----------------------------------------------------------------------------
def test_errors_are_the_services_own(start: Callable[..., TestClient]) -> None:
    client = start()
    url = f"/v1/models/{MODEL}/explain"
    text = ("notes.txt", b"just some text")
    assert_error(post(client, url, text), 415, "unsupported_image_type", "notes.txt")
    mixed = post(client, url, ("l.png", LEFT), text).json()["explanations"]
    assert [m["status"] for m in mixed] == ["ok", "error"]
    assert mixed[1]["filename"] == "notes.txt" and mixed[0]["filename"] == "l.png"
    assert mixed[1]["error"]["code"] == "unsupported_image_type"
    unknown = post(client, url, ("l.png", LEFT), target="banana")
    assert_error(unknown, 422, "unknown_class", "banana", "battery")
    assert_error(post(client, url, ("l.png", LEFT), top_k=13), 422, "invalid_top_k")
    four = [(f"{i}.png", LEFT) for i in range(4)]
    assert_error(post(client, url, *four), 413, "too_many_files", "WASTE_EXPLAIN_MAX_FILES")
    assert post(client, url, *four[:3]).status_code == 200


def test_a_full_bound_is_a_fast_503_while_predict_still_answers(
    start: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = start(explain_concurrency=1, explain_queue=1)
    explainer = service_of(client).explainer
    gate = threading.Event()
    real = explain_module.explain

    def held(*args: Any, **kwargs: Any) -> list[Explanation]:
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_module, "explain", held)
    answers: list[Any] = []

    def send() -> None:
        answers.append(post(client, "/v1/explain", ("l.png", LEFT)))

    threads = [threading.Thread(target=send) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: explainer.admitted == 2, what="one running, one waiting")
        refused = post(client, "/v1/explain", ("r.png", RIGHT))
        assert_error(refused, 503, "explain_busy", "WASTE_EXPLAIN_CONCURRENCY")
        assert int(refused.headers["retry-after"]) >= 1
        # Predictions do not wait for explanations.
        predicted = post(client, "/v1/predict", ("r.png", RIGHT))
        assert predicted.status_code == 200
    finally:
        gate.set()
        for thread in threads:
            thread.join(30)
    assert [a.status_code for a in answers] == [200, 200]
    wait_until(lambda: explainer.admitted == 0, what="slots given back")
    assert post(client, "/v1/explain", ("r.png", RIGHT)).status_code == 200
    metrics = client.get("/metrics").text
    assert (
        f'waste_explain_requests_total{{model="{MODEL}",status="503",version="1"}} 1.0' in metrics
    )
    assert (
        f'waste_explain_requests_total{{model="{MODEL}",status="200",version="1"}} 3.0' in metrics
    )


def test_a_slot_stays_taken_until_its_computation_ends_even_after_a_timeout(
    start: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = start(explain_concurrency=1, explain_queue=0, request_timeout_s=0.5)
    explainer = service_of(client).explainer
    gate = threading.Event()
    real = explain_module.explain
    monkeypatch.setattr(
        explain_module, "explain", lambda *a, **k: (gate.wait(30), real(*a, **k))[1]
    )
    try:
        timed_out = post(client, "/v1/explain", ("l.png", LEFT))
        assert_error(timed_out, 503, "timeout", "WASTE_REQUEST_TIMEOUT_S")
        assert explainer.admitted == 1  # still computing: the bound still counts it
        assert_error(post(client, "/v1/explain", ("l.png", LEFT)), 503, "explain_busy")
    finally:
        gate.set()
    wait_until(lambda: explainer.admitted == 0, what="slot given back")


def test_explain_threads_take_their_own_torch_thread_count_and_leave_the_default() -> None:
    before = torch.get_num_threads()
    pool = start_explain_pool(concurrency=2, threads=1)
    try:
        seen = {pool.submit(torch.get_num_threads).result() for _ in range(4)}
        assert seen == {1}
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [before] and torch.get_num_threads() == before
    finally:
        pool.shutdown()


def test_explain_is_documented_with_typed_bodies(start: Callable[..., TestClient]) -> None:
    spec = start().get("/openapi.json").json()
    for path in (
        "/v1/explain",
        "/v1/models/{name}/explain",
        "/v1/models/{name}/versions/{version}/explain",
    ):
        operation = spec["paths"][path]["post"]
        assert {p["name"] for p in operation["parameters"]} >= {"top_k", "target"}
        assert "multipart/form-data" in operation["requestBody"]["content"]
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": "#/components/schemas/ExplainResponse"}
        assert {"413", "415", "422", "503"} <= set(operation["responses"])
    heatmap = spec["components"]["schemas"]["Heatmap"]["properties"]
    assert set(heatmap) == {"height", "width", "values", "overlay_png"}


def test_pace_rests_each_thread_so_that_it_computes_at_most_its_share() -> None:
    pace = Pace(0.25)
    starts: list[float] = []
    for _ in range(3):
        with pace:
            starts.append(time.monotonic())
            time.sleep(0.05)
    # 50 ms of work earns 150 ms of rest: each start is 200 ms after the previous one.
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(0.19 < gap < 0.35 for gap in gaps), gaps
    # Another thread has its own budget: it starts at once.
    other: list[float] = []
    begun = time.monotonic()
    thread = threading.Thread(target=lambda: other.append(_enter_at_once(pace)))
    thread.start()
    thread.join()
    assert other[0] - begun < 0.05


def _enter_at_once(pace: Pace) -> float:
    with pace:
        return time.monotonic()
