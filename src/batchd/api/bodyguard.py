"""Request bodies that stop arriving, and answers sent before a body was read.

An ASGI middleware around the whole app:

- While a request's body is being read, each wait for the next piece is bounded by
  ``limits.body_timeout_seconds``: a client that sends part of a body and stops gets a 408
  (:class:`batchd.errors.BodyTimeout`, raised from ``receive``, so the handler's usual
  clean-up runs: an upload is aborted and nothing is left behind).
- An answer that starts before the request's body was read to its end (a 4xx refusing the
  body, the 408 above) carries ``Connection: close``: the server stops reading, instead of
  reading on, or waiting on, a body nobody will use, and the client cannot send the rest
  as the next request.

Requests without a body (no ``Content-Length`` or a zero one, no ``Transfer-Encoding``) pass
through untouched, and so does every ``receive`` after the body's last piece (Starlette
listens for the client's disconnect while streaming a download).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd.errors import BodyTimeout


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class BodyGuard:
    def __init__(self, app: ASGIApp, *, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = {"ended": False}
        timeout = self.timeout

        async def timed_receive() -> Message:
            if state["ended"]:
                return await receive()
            try:
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(
                    f"The request body stopped arriving: no byte for {timeout:g} seconds "
                    "(limits.body_timeout_seconds). Nothing was stored.",
                    code="body_timeout",
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["ended"] = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not state["ended"]:
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"connection"]
                headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, timed_receive, closing_send)
