"""The two error envelopes batchd writes: OpenAI's and Anthropic's.

Every error body built anywhere in batchd comes from here: the HTTP API's answers
(``api/errors.py``, the HTTP parser's and the local guard's refusals), the bodies recorded for
requests that got no usable answer (``engine/``), the embedded backends' refusals
(``backends/``), Anthropic's result lines (``service/messages_format.py``) and the fake
upstream. Both builders return a fresh ``dict`` (callers encode it with ``orjson``); keys are
in the order the APIs send them, so the encoded bytes are the same wherever one is built.

- OpenAI (and Azure): ``{"error": {"message", "type", "param", "code"}}`` (the ``openai``
  SDK's ``ErrorObject``); Azure adds fields after ``code`` (``status``, ``innererror``).
- Anthropic: ``{"type": "error", "error": {"type", "message"}}`` (the ``anthropic`` SDK's
  ``ErrorResponse``; its error types are in ``types/shared/``).

Imports nothing else of batchd's, so that every layer may use it.
"""

from __future__ import annotations

from typing import Any

# OpenAI's error types by HTTP status; any other status is a ``server_error``.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    416: "invalid_request_error",
    429: "rate_limit_error",
}

# Anthropic's error types by HTTP status (the ``anthropic`` SDK's ``types/shared/``).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def openai_error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status (``server_error`` for any status not
    listed: 5xx and the unusual 4xx)."""
    return _OPENAI_TYPES.get(status, "server_error")


def openai_error(
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """OpenAI's error body ``{"error": {"message", "type", "param", "code", **extra}}``;
    ``extra`` (Azure's ``status``, ``innererror``) follows ``code`` in the order given."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def anthropic_error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status (``api_error`` for any other 5xx,
    ``invalid_request_error`` for any other 4xx)."""
    return ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error(message: str, type_: str) -> dict[str, Any]:
    """Anthropic's error body ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": type_, "message": message}}
