"""min_confidence: images whose top probability is below it are answered 'uncertain'.

The images differ in colour and layout, so a random network gives each its own top
probability; the threshold is put between them, so that some images fall below it and
some above, and each answer is checked against the confidence that image got without it.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from app.prediction import image_prediction
from tests.app.conftest import MODEL, files
from tests.app.test_api import assert_error
from wastenet.classes import CLASS_NAMES

MakeClient = Callable[..., TestClient]


def scene(background: tuple[int, int, int], spot: tuple[int, int, int], corner: int) -> bytes:
    img = Image.new("RGB", (48, 40), background)
    x, y = [(2, 2), (26, 2), (2, 20), (26, 20)][corner]
    ImageDraw.Draw(img).rectangle((x, y, x + 18, y + 16), fill=spot)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


IMAGES = [
    (f"{i}.png", scene(bg, spot, i % 4))
    for i, (bg, spot) in enumerate(
        [
            ((250, 250, 250), (0, 0, 0)),
            ((10, 10, 10), (255, 255, 0)),
            ((200, 40, 30), (20, 200, 240)),
            ((30, 160, 60), (240, 240, 240)),
            ((90, 60, 200), (250, 120, 0)),
            ((128, 128, 128), (0, 90, 255)),
        ]
    )
]


def confidences(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.post("/v1/predict", files=files(*IMAGES), params=params)
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def split_threshold(plain: list[dict[str, Any]]) -> float:
    """A threshold with images on both sides of it, away from every confidence."""
    values = sorted(p["confidence"] for p in plain)
    gaps = [(b - a, (a + b) / 2) for a, b in itertools.pairwise(values)]
    width, middle = max(gaps)
    assert width > 1e-4, values  # the images must not all get the same confidence
    return middle


def uncertain_count(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("waste_uncertain_images_total{") and f'model="{MODEL}"' in line:
            assert 'version="2"' in line
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_images_below_the_threshold_are_uncertain_and_keep_their_top_k(
    make_client: MakeClient,
) -> None:
    client = make_client()
    plain = confidences(client)
    assert all(not p["uncertain"] for p in plain)
    threshold = split_threshold(plain)
    response = client.post(
        "/v1/predict", files=files(*IMAGES), params={"min_confidence": threshold, "top_k": 4}
    )
    body = response.json()
    assert body["min_confidence"] == threshold
    below = 0
    for before, after in zip(plain, body["predictions"], strict=True):
        assert after["filename"] == before["filename"]
        assert after["confidence"] == pytest.approx(before["confidence"], abs=1e-6)
        assert after["top_k"][:3] == before["top_k"]  # still listed, most likely first
        if before["confidence"] < threshold:
            below += 1
            assert (after["label"], after["class_index"], after["uncertain"]) == (
                "uncertain",
                None,
                True,
            )
        else:
            assert (after["label"], after["class_index"], after["uncertain"]) == (
                before["label"],
                before["class_index"],
                False,
            )
    assert 0 < below < len(IMAGES)
    assert uncertain_count(client) == below


def test_the_default_comes_from_the_setting_and_a_request_overrides_it(
    make_client: MakeClient,
) -> None:
    probe = confidences(make_client())
    threshold = split_threshold(probe)
    expected = [p["confidence"] < threshold for p in probe]
    client = make_client(min_confidence=threshold)
    by_default = confidences(client)
    assert [p["uncertain"] for p in by_default] == expected
    assert [p["uncertain"] for p in confidences(client, min_confidence=0)] == [False] * 6
    assert all(p["uncertain"] for p in confidences(client, min_confidence=1))
    assert uncertain_count(client) == sum(expected) + len(IMAGES)


def test_min_confidence_outside_zero_to_one_is_refused(make_client: MakeClient) -> None:
    client = make_client()
    for bad in ("1.5", "-0.1", "high"):
        response = client.post(
            f"/v1/models/{MODEL}/predict", files=files(IMAGES[0]), params={"min_confidence": bad}
        )
        assert_error(response, 422, "invalid_request", "min_confidence")


def test_the_threshold_itself_is_not_uncertain() -> None:
    top = [(3, 0.5), (7, 0.3)]
    at = image_prediction("a.png", top, CLASS_NAMES, min_confidence=0.5)
    assert (at.label, at.class_index, at.uncertain) == ("cardboard", 3, False)
    above = image_prediction("a.png", top, CLASS_NAMES, min_confidence=0.5000001)
    assert (above.label, above.class_index, above.uncertain) == ("uncertain", None, True)
    assert [s.label for s in above.top_k] == ["cardboard", "paper"]


def test_min_confidence_is_documented_on_every_predict_route(make_client: MakeClient) -> None:
    spec = make_client().get("/openapi.json").json()
    for path in (
        "/v1/predict",
        "/v1/models/{name}/predict",
        "/v1/models/{name}/versions/{version}/predict",
    ):
        params = {p["name"]: p for p in spec["paths"][path]["post"]["parameters"]}
        schema = params["min_confidence"]["schema"]["anyOf"][0]
        assert (schema["minimum"], schema["maximum"]) == (0.0, 1.0)
        assert "uncertain" in params["min_confidence"]["description"]
    prediction = spec["components"]["schemas"]["ImagePrediction"]["properties"]
    assert "uncertain" in prediction and "uncertain" in prediction["label"]["description"]
