"""Without ``[auth]``, who may talk to the API: this machine's own clients, not web pages.

A server with no keys trusts whoever reaches it (local use only, as the start-up log says).
A web page open in the user's browser reaches it too: a cross-site form or ``fetch`` could
cancel batches or upload files, and DNS rebinding (a hostile name that resolves to
127.0.0.1) could read every file. So, only when ``[auth]`` is absent:

- a request whose ``Host`` is not an IP address, ``localhost`` (or ``*.localhost``) or one of
  ``allowed_hosts`` is refused (403 ``host_not_allowed``): a rebound name never matches;
- a state-changing request (anything but GET, HEAD, OPTIONS) that a browser marks as coming
  from another site (``Sec-Fetch-Site: cross-site`` or ``same-site``, or an ``Origin`` other
  than the ``Host``) is refused (403 ``cross_site_request``). Clients that are not browsers
  (the SDKs, curl) send neither header and pass.

With ``[auth]`` the keys decide, and a page cannot know them (the dashboard has its own CSRF
defence, ui/session.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from batchd.envelopes import openai_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _hostname(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_local_name(name: str, allowed: frozenset[str]) -> bool:
    name = name.lower().rstrip(".")
    if name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class LocalGuard:
    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(h.lower().rstrip(".") for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k: v for k, v in scope.get("headers", ())}
        host = headers.get(b"host", b"").decode("latin-1")
        if host and "*" not in self.allowed and not _is_local_name(_hostname(host), self.allowed):
            await _refuse(
                send,
                "host_not_allowed",
                f"Host {host[:64]!r} is not this server's: without [auth], batchd answers "
                "IP addresses, localhost and the names in allowed_hosts only.",
            )
            return
        if scope["method"] not in SAFE_METHODS:
            site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
            origin = headers.get(b"origin", b"").decode("latin-1")
            foreign = origin not in ("", "null") and urlsplit(origin).netloc.lower() != (
                host.lower()
            )
            if site in ("cross-site", "same-site") or foreign or origin == "null":
                await _refuse(
                    send,
                    "cross_site_request",
                    "The request came from a web page of another site; without [auth], batchd "
                    "accepts changes only from its own clients.",
                )
                return
        await self.app(scope, receive, send)


async def _refuse(send: Send, code: str, message: str) -> None:
    body = orjson.dumps(openai_error(message, "invalid_request_error", code=code))
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-should-retry", b"false"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
