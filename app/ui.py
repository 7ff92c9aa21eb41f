"""The browser page and the API docs, served from the install: no CDN, works offline.

- ``GET /`` (and ``/ui``): one static page (``app/static/``: HTML, CSS and plain
  JavaScript, no build step) that calls only the public API: ``/v1/models``, predict and
  explain, with the same limits as any client.
- ``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc): FastAPI's own pages, pointed at
  the Swagger UI and ReDoc bundles that the ``fastapi-offline`` package ships (its MIT
  licence; Swagger UI is Apache-2.0, ReDoc MIT) instead of a CDN.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
STATIC_URL = "/static"
DOCS_ASSETS_URL = "/docs-assets"
PAGE = STATIC_DIR / "index.html"

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/ui")
async def page() -> FileResponse:
    """The browser page: pick a model and version, drop images, see the answers."""
    return FileResponse(PAGE, media_type="text/html")


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{app.swagger_ui_oauth2_redirect_url}",
        swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
    )


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    return get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


def install_ui(app: FastAPI) -> None:
    """Add the page, the docs and their assets (create the app with docs_url=None)."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    app.include_router(router)


def page_url(settings: Settings) -> str:
    """Where a person on this machine finds the page (a wildcard bind answers on loopback)."""
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/"
