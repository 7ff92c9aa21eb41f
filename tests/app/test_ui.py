"""The page and the API docs are served from the install, with nothing from elsewhere.

The browser itself drives the page in tests/app/ui/; here: what the routes serve, and
that no page or asset the service sends names another host.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.settings import load_settings
from app.ui import DOCS_ASSETS_DIR, STATIC_DIR, page_url

MakeClient = Callable[..., TestClient]
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def local_references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


@pytest.mark.parametrize("path", ["/", "/ui"])
def test_the_page_and_its_assets_come_from_the_install(make_client: MakeClient, path: str) -> None:
    client = make_client()
    page = client.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == (STATIC_DIR / "index.html").read_text()
    refs = [r for r in local_references(page.text) if not r.startswith("data:")]
    assert set(refs) >= {"static/app.js", "static/style.css", "docs", "redoc"}
    for ref in refs:
        assert client.get("/" + ref).status_code == 200, ref
    for asset in ("index.html", "app.js", "style.css"):
        text = (STATIC_DIR / asset).read_text()
        assert "http://" not in text and "https://" not in text, asset
        assert not EXTERNAL.search(text), asset


@pytest.mark.parametrize(
    ("path", "assets"),
    [
        ("/docs", ["/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"]),
        ("/redoc", ["/docs-assets/redoc.standalone.js"]),
    ],
)
def test_docs_load_their_scripts_from_the_service(
    make_client: MakeClient, path: str, assets: list[str]
) -> None:
    client = make_client()
    html = client.get(path).text
    assert not EXTERNAL.search(html), html
    assert "fonts.googleapis" not in html and "cdn" not in html.lower()
    refs = local_references(html)
    assert set(assets) <= set(refs)
    for ref in refs:
        response = client.get(ref)
        assert response.status_code == 200, ref
        assert len(response.content) > 1000, ref
    assert "/openapi.json" in html


def test_docs_assets_ship_with_the_dependency() -> None:
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        assert (DOCS_ASSETS_DIR / name).stat().st_size > 100_000, name


def test_page_and_docs_are_not_api_operations(make_client: MakeClient) -> None:
    paths = make_client().get("/openapi.json").json()["paths"]
    assert not {"/", "/ui", "/docs", "/redoc"} & set(paths)


def test_page_url_names_an_address_a_browser_here_can_open() -> None:
    assert page_url(load_settings(host="0.0.0.0", port=8080)) == "http://127.0.0.1:8080/"
    assert page_url(load_settings(host="127.0.0.1", port=8000)) == "http://127.0.0.1:8000/"
    assert page_url(load_settings(host="::1", port=9000)) == "http://[::1]:9000/"
