"""The FastAPI application: ``create_app()`` builds it from settings.

Run it with ``python -m app`` (uvicorn with the server settings), or with any ASGI server
as the factory ``app.main:create_app``. The browser page is at ``/``, the OpenAPI document
at ``/openapi.json`` and the interactive docs at ``/docs`` and ``/redoc`` (assets served
from the install, see app/ui.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.errors import GENERAL_ERRORS, install_error_handlers
from app.head import HeadAsGet
from app.middleware import install_middleware
from app.routes import router
from app.service import Service
from app.settings import Settings, load_settings
from app.ui import install_ui
from app.v2.routes import router as v2_router

DESCRIPTION = """\
Classifies photos of waste into 12 classes (battery, biological, brown_glass, cardboard,
clothes, green_glass, metal, paper, plastic, shoes, trash, white_glass).

Upload one or more images as multipart/form-data in the field `files`. Every response
names the model and version that answered. Every error has the same JSON shape:
`{"error": {"code", "message", "details"}}`.

Predict takes `min_confidence`: an image whose top probability is below it is answered
`label: "uncertain"` (top-k still given), so that a sorting line can send it to manual
sorting. `explain` returns, per image, Grad-CAM of the predicted (or a `target`) class and
the spatial attention of the last CBAM, as small arrays and PNG overlays. A browser page on
both is served at `/`.

The Open Inference Protocol (KServe V2) is served under `/v2`: health, metadata and
inference on a BYTES tensor of encoded images or an FP32 tensor of normalised ones, with the
binary tensor data and classification extensions. Its errors have the protocol's shape,
`{"error": "message"}`. It has no "uncertain" answer (the protocol's classification output
is a class and its score): apply a threshold to the scores it returns.

Every GET endpoint also answers HEAD: the same status and headers, without the body.

Each operation's id is its short name (`list_models`, `predict_version`, `infer`, ...), the
method name in a client generated from this document. Each error response names its
codes.
"""
DESCRIPTION += GENERAL_ERRORS + "\n"


def _operation_id(route: APIRoute) -> str:
    """The route function's name: FastAPI's default adds the path and method
    ('predict_version_v1_models__name__versions__version__predict_post'), which becomes
    the method name in a generated client."""
    return route.name


def _configure_logging(level: str) -> None:
    """Give the service's loggers a handler like uvicorn's, unless the host app set one."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; settings default to the ``WASTE_*`` environment (validated here)."""
    settings = settings or load_settings()
    _configure_logging(settings.log_level)
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="Waste classifier",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by app.ui from the install, not from a CDN
        redoc_url=None,
        generate_unique_id_function=_operation_id,
    )
    app.state.service = service
    install_error_handlers(app)
    install_middleware(app)
    app.include_router(router)
    app.include_router(v2_router)
    install_ui(app)
    app.add_middleware(HeadAsGet, router=app.router)
    return app
