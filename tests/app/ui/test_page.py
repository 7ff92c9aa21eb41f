"""The browser page, driven in headless Chromium against a real server on loopback.

What the page renders is compared with what the API answers for the same files: the
top-k labels and percentages, the version and backend that answered, and the overlay
image itself. Every page fails its test on a script error or on any request that leaves
the machine (the page, its assets and the docs must work offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.test_explain import LEFT, MODEL, RIGHT, SIZE

pytestmark = pytest.mark.slow
TIMEOUT_MS = 60_000


@pytest.fixture
def uploads(tmp_path: Path) -> dict[str, Path]:
    paths = {"left.png": LEFT, "right.png": RIGHT, "notes.txt": b"shopping list, not a photo"}
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in paths}


def api(server: str, path: str, upload: Path, **params: Any) -> dict[str, Any]:
    with upload.open("rb") as f:
        response = httpx.post(
            server + path, files={"files": (upload.name, f.read())}, params=params, timeout=60
        )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def open_page(page: Any, server: str) -> None:
    page.goto(server)
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def card(page: Any, filename: str) -> Any:
    return page.locator("article.result", has_text=filename)


def wait_overlays(page: Any, count: int) -> None:
    page.wait_for_function(
        f"document.querySelectorAll('img.overlay:not([hidden])').length >= {count}",
        timeout=TIMEOUT_MS,
    )


def shoot(page: Any, screenshots: Path, name: str) -> None:
    path = screenshots / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_uploads_show_top_k_version_and_overlay_as_the_api_answers(
    page: Any, server: str, uploads: dict[str, Path], screenshots: Path
) -> None:
    open_page(page, server)
    assert page.locator("#model").input_value() == MODEL
    page.select_option("#version", "2")
    page.set_input_files("#files", [str(uploads["left.png"]), str(uploads["right.png"])])
    wait_overlays(page, 2)
    for name in ("left.png", "right.png"):
        expected = api(server, f"v1/models/{MODEL}/versions/2/predict", uploads[name])
        prediction = expected["predictions"][0]
        shown = card(page, name)
        assert shown.locator(".label").inner_text() == prediction["label"]
        assert shown.locator(".bar-label").all_inner_texts() == [
            s["label"] for s in prediction["top_k"]
        ]
        assert shown.locator(".bar-pct").all_inner_texts() == [
            f"{100 * s['confidence']:.1f}%" for s in prediction["top_k"]
        ]
        assert shown.locator(".answered-by").inner_text().startswith(f"{MODEL} v2 · torch fp32 · ")
        explained = api(server, f"v1/models/{MODEL}/versions/2/explain", uploads[name], top_k=1)
        overlay = shown.locator("img.overlay")
        src = overlay.get_attribute("src")
        assert (
            src
            == "data:image/png;base64," + explained["explanations"][0]["grad_cam"]["overlay_png"]
        )
        assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [SIZE, SIZE]
    shoot(page, screenshots, "page-two-images.png")


def test_another_class_and_the_attention_map_redraw_the_overlay(
    page: Any, server: str, uploads: dict[str, Path], screenshots: Path
) -> None:
    open_page(page, server)
    page.set_input_files("#files", str(uploads["right.png"]))
    wait_overlays(page, 1)
    shown = card(page, "right.png")
    overlay = shown.locator("img.overlay")
    predicted = shown.locator(".label").inner_text()
    other = "metal" if predicted != "metal" else "paper"
    shown.locator("select.target").select_option(other)
    page.wait_for_function(
        "([el, name]) => el.closest('article').dataset.target === name",
        arg=[overlay.element_handle(), other],
        timeout=TIMEOUT_MS,
    )
    explained = api(server, f"v1/models/{MODEL}/explain", uploads["right.png"], target=other)
    item = explained["explanations"][0]
    assert overlay.get_attribute("src").endswith(item["grad_cam"]["overlay_png"])
    shown.locator("select.map-kind").select_option("attention")
    assert overlay.get_attribute("src").endswith(item["attention"]["overlay_png"])
    # The default version answered: 'production' points to v1.
    assert f"{MODEL} v1 · " in shown.locator(".answered-by").inner_text()
    shoot(page, screenshots, "page-attention.png")


def test_an_image_below_min_confidence_is_shown_uncertain(
    page: Any, server: str, uploads: dict[str, Path]
) -> None:
    open_page(page, server)
    page.fill("#min-confidence", "0.99")
    page.set_input_files("#files", str(uploads["left.png"]))
    shown = card(page, "left.png")
    label = shown.locator(".label")
    label.filter(has_text="uncertain").wait_for(timeout=TIMEOUT_MS)
    assert label.inner_text() == "uncertain (below 99.0%)"
    assert len(shown.locator(".bar-row").all()) == 3  # the top-k is still shown


def test_api_errors_are_shown_as_readable_messages(
    page: Any, server: str, uploads: dict[str, Path], screenshots: Path
) -> None:
    open_page(page, server)
    page.set_input_files("#files", str(uploads["notes.txt"]))
    banner = page.locator("#banner")
    banner.wait_for(state="visible", timeout=TIMEOUT_MS)
    text = banner.inner_text()
    assert "file 'notes.txt' is text, not an image" in text, text
    assert "(HTTP 415, unsupported_image_type)" in text, text
    assert "{" not in text  # the message, not the JSON it came in
    assert card(page, "notes.txt").locator(".error").inner_text() == text
    # One bad file among good ones: that card says why, the others are classified.
    page.set_input_files("#files", [str(uploads["left.png"]), str(uploads["notes.txt"])])
    wait_overlays(page, 1)
    errors = page.locator("article.result .error:visible").all_inner_texts()
    assert len(errors) == 2 and all("is text, not an image" in e for e in errors)
    shoot(page, screenshots, "page-errors.png")


def test_docs_and_redoc_render_offline(page: Any, server: str) -> None:
    page.goto(server + "docs")
    page.locator(".swagger-ui .opblock-summary-path", has_text="/v1/explain").first.wait_for(
        timeout=TIMEOUT_MS
    )
    # ReDoc's sidebar footer always asks Redocly's CDN for its logo and hides the image when
    # that fails: the one request that leaves the page offline, and it changes nothing.
    logo: list[str] = []
    page.route(
        "https://cdn.redoc.ly/**", lambda route: (logo.append(route.request.url), route.abort())
    )
    page.goto(server + "redoc")
    page.locator("h2", has_text="Explain Default").first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("API docs by Redocly").wait_for(timeout=TIMEOUT_MS)
    assert set(logo) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}
