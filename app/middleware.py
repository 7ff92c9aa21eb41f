"""ASGI middleware around the routes: cheap load shedding, and answers for cancelled requests.

- :class:`ShedOverload` refuses a prediction (/v1 predict, /v2 infer) whose version's
  queue is full from its path alone, before routing, parameter validation and
  dependencies: under overload most requests are refused, and each refusal must cost
  far less than a served request (FastAPI's routing and dependency solving alone cost
  about 120 µs of CPU per request; ``benchmarks/overload.py`` measures the whole).
- :class:`AnswerCancelled`: when ``WASTE_GRACEFUL_SHUTDOWN_S`` runs out, uvicorn cancels
  the requests still running (a stalled upload, say); uvicorn would then answer a bare
  text 500 and log a ``CancelledError`` traceback. Such a request gets the JSON error
  shape and 503 ``shutting_down`` (with Retry-After), which clients retry elsewhere.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ServiceError, service_error_response

log = logging.getLogger("app")


async def _answer(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    response = service_error_response(Request(scope), error)  # /v2 gets the protocol's shape
    await response(scope, receive, send)


class ShedOverload:
    """Answer 503 ``overloaded`` before routing when the target version's queue is full."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            service = getattr(scope["app"].state, "service", None)
            refusal = service.predictor.shed(scope["path"]) if service is not None else None
            if refusal is not None:
                await _answer(refusal, scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    app.add_middleware(ShedOverload)  # added last: runs first
