"""HEAD answered like GET without the body (RFC 9110, section 9.3.2).

FastAPI's routes answer only the methods they declare, so a load balancer or uptime probe
that sends HEAD to ``/health/live`` got 405. Starlette's plain routes add HEAD for GET
themselves; this middleware does the same for every route of the app, those added later
included: a HEAD request whose path has a GET route runs as that GET, with the same status
and headers (Content-Length included) and no body. Any other HEAD goes through unchanged
(404, or 405 naming HEAD). The GET handler still builds its body; only the send is saved.
"""

from __future__ import annotations

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """ASGI middleware: HEAD on a path with a GET route is that GET, minus the body."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}
        if not self._has_get(as_get):
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.start":
                await send(message)
            else:  # the body, in any form (chunks, a file to send): drop it, keep the framing
                more = message["type"] == "http.response.body" and message.get("more_body", False)
                await send({"type": "http.response.body", "body": b"", "more_body": more})

        await self.app(as_get, receive, send_without_body)

    def _has_get(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self.router.routes)
