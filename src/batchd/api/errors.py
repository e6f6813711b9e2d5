"""Every error the HTTP API returns, in the envelope of the API its path belongs to.

OpenAI's ``{"error": {"message", "type", "param", "code"}}``; on Anthropic's Message Batches
paths (``/v1/messages/...``) Anthropic's ``{"type": "error", "error": {"type", "message"}}``
(both built by :mod:`batchd.envelopes`).
Final client errors carry ``x-should-retry: false`` so that the SDK does not retry them
(it retries 408, 409, 429, 5xx); a 408 (the body stopped arriving) and a 429 may be
retried. A message is at most :data:`MAX_MESSAGE` characters and a param
:data:`MAX_PARAM`, whatever a client sent. A 405 names in ``Allow``
every method the path has (RFC 9110 §15.5.6), not only one route's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import compile_path

from batchd.envelopes import anthropic_error, anthropic_error_type, openai_error, openai_error_type
from batchd.errors import ApiError

log = logging.getLogger(__name__)

MAX_MESSAGE = 1000
MAX_PARAM = 128
RETRYABLE = frozenset({408, 429})
ANTHROPIC_PREFIX = "/v1/messages"  # Anthropic's Message Batches: its error envelope


def _truncated(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def _json_error(status: int, body: dict[str, Any], headers: Mapping[str, str] | None) -> Response:
    h = dict(headers or {})
    if 400 <= status < 500 and status not in RETRYABLE:
        h["x-should-retry"] = "false"
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=h
    )


def error_response(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """OpenAI's envelope; ``type_`` defaults to the status's type."""
    body = openai_error(
        _truncated(message),
        type_ or openai_error_type(status),
        param=param[:MAX_PARAM] if param else param,
        code=code,
    )
    return _json_error(status, body, headers)


def anthropic_error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """Anthropic's envelope ``{"type": "error", "error": {"type", "message"}}`` (the
    Message Batches routes), with the same ``x-should-retry`` rule as above."""
    body = anthropic_error(_truncated(message), anthropic_error_type(status))
    return _json_error(status, body, headers)


def _respond(
    request: Request,
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The error in the envelope of the API the path belongs to."""
    if request.url.path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error_response(status, message, headers)
    return error_response(status, message, type_=type_, code=code, param=param, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    response = _respond(
        request, exc.status_code, exc.message, type_=exc.error_type, code=exc.code, param=exc.param
    )
    if not exc.final:
        response.headers["x-should-retry"] = "true"
    return response


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header")]
    param = ".".join(loc) or None
    msg = first.get("msg", "Invalid request")
    return _respond(
        request, 400, f"Invalid parameter {param}: {msg}", code="invalid_value", param=param
    )


class MethodTable:
    """Which methods each route path accepts, to name them all in a 405's ``Allow``."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], frozenset[str]]] = []

    def add(self, path: str, methods: Iterable[str]) -> None:
        regex, _, _ = compile_path(path)
        self._routes.append((regex, frozenset(methods)))

    def allowed(self, path: str) -> list[str]:
        found: set[str] = set()
        for regex, methods in self._routes:
            if regex.match(path):
                found |= methods
        return sorted(found)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = str(exc.detail) if exc.detail else "Error"
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = "Not found: no such route."
    elif exc.status_code == 405:
        table: MethodTable = request.app.state.methods
        allow = table.allowed(request.url.path)
        headers["Allow"] = ", ".join(allow)
        message = f"Method {request.method[:16]} not allowed here; allowed: {', '.join(allow)}."
    return _respond(request, exc.status_code, message, code=code, headers=headers)


async def _disconnected(request: Request, exc: Exception) -> Response:
    """The client went away before its body ended: nothing to answer (the upload was
    aborted by its handler); not an error of the server."""
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return _respond(
        request, 400, "The client disconnected before the request body ended.",
        code="incomplete_body",
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(
        request, 500, "The server had an error processing your request.", code="server_error"
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _disconnected)
    app.add_exception_handler(Exception, _unexpected)
