"""ASGI middleware around the routes.

- :class:`AnswerCancelled`: when ``WASTE_GRACEFUL_SHUTDOWN_S`` runs out, uvicorn cancels
  the requests still running (a stalled upload, say); uvicorn would then answer a bare
  text 500 and log a ``CancelledError`` traceback. Such a request gets the JSON error
  shape and 503 ``shutting_down`` (with Retry-After), which clients retry elsewhere.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ServiceError, error_response

log = logging.getLogger("app")


async def _answer(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(
        error.status_code, error.code, error.message, error.details, error.headers
    )
    await response(scope, receive, send)


class AnswerCancelled:
    """Turn a cancellation before the response started into a JSON 503 (module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if started:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # this task answers, then ends normally
            log.warning("cancelled %s %s at shutdown; answered 503", scope["method"], scope["path"])
            error = ServiceError(
                "the service is shutting down and this request did not finish within "
                "WASTE_GRACEFUL_SHUTDOWN_S; retry",
                code="shutting_down",
                status_code=503,
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await _answer(error, scope, receive, send)


def install_middleware(app: FastAPI) -> None:
    app.add_middleware(AnswerCancelled)
