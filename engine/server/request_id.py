"""`X-Request-Id`: the client's id for a request, echoed back and used as the engine's request id.

vLLM does this with --enable-request-id-headers; here it is always on. A request without the header
gets a fresh id, returned in the same header, so a client can always match a response (and the
server's log lines) to what it sent. The completion's own `id` is the endpoint's prefix and this id
(`chatcmpl-<id>`, `cmpl-<id>`), as in vLLM.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode("latin-1")
_SCOPE_KEY = "tierkv.request_id"


class RequestIdHeader:
    """ASGI middleware: pick each request's id (the header, or a new one) and put it on the response.

    A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, which would wrap `receive` and
    hide a client's disconnect from the routes that watch for it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(_HEADER_KEY, b"").decode("latin-1").strip()
        request_id = given or uuid.uuid4().hex
        scope[_SCOPE_KEY] = request_id
        value = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != _HEADER_KEY]
                message = {**message, "headers": [*headers, (_HEADER_KEY, value)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id_of(request: Request) -> str:
    """The id `RequestIdHeader` chose for this request."""
    return request.scope[_SCOPE_KEY]
