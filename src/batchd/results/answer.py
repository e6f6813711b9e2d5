"""From an upstream's answer to a result record (:mod:`batchd.results.record`).

A 2xx body is kept exactly as the upstream sent it (no parse and dump), after one check that
it is a single line of valid UTF-8 JSON; its ``usage`` is read with a decoder that skips
everything else. A 2xx whose body is not a JSON object fails as a 502
``invalid_upstream_response``; a non-2xx fails with its body (wrapped in an error when it is
not JSON).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import msgspec
import orjson

from batchd.backends.base import UpstreamResponse
from batchd.envelopes import openai_error
from batchd.models import Usage
from batchd.results.record import answered, unanswered

log = logging.getLogger(__name__)


class _Body(msgspec.Struct):
    """What a result body must be (a JSON object) and the one field read from it. ``usage``
    is untyped: gateways send ``null`` details, floats or extra fields, and a body is never
    rejected for its usage (:func:`read_usage` reads it leniently)."""

    usage: Any = None


_body_decoder = msgspec.json.Decoder(_Body)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


# No answer uses more (the longest contexts are ~10**7 tokens); capped so that a batch's sums
# of 100,000 answers stay far inside the store's 64-bit integers.
MAX_TOKENS_PER_ANSWER = 2**40


def _count(value: Any) -> int:
    """A token count as sent: an int, a float (truncated), anything else 0; at most
    :data:`MAX_TOKENS_PER_ANSWER`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return max(0, min(int(value), MAX_TOKENS_PER_ANSWER))


def _field(obj: Any, *names: str) -> Any:
    """The first of ``names`` present (and not null) in ``obj``, when it is an object."""
    if isinstance(obj, dict):
        for name in names:
            value = obj.get(name)
            if value is not None:
                return value
    return None


def read_usage(usage: Any) -> Usage:
    """Chat/completions (``prompt_tokens``...), responses (``input_tokens``...) or Anthropic
    Messages usage, read leniently: a null, float, missing or odd field counts as what it is
    or 0. Anthropic's ``input_tokens`` leave out the cache's: its ``cache_read_input_tokens``
    and ``cache_creation_input_tokens`` are added, so input counts every prompt token as
    OpenAI's do, and cache reads are the cached ones."""
    if not isinstance(usage, dict):
        return Usage()
    cache_read = usage.get("cache_read_input_tokens")
    cache_made = usage.get("cache_creation_input_tokens")
    if cache_read is not None or cache_made is not None:
        read = _count(cache_read)
        return Usage(
            input_tokens=min(
                _count(usage.get("input_tokens")) + read + _count(cache_made),
                MAX_TOKENS_PER_ANSWER,
            ),
            cached_tokens=read,
            output_tokens=_count(usage.get("output_tokens")),
        )
    return Usage(
        input_tokens=_count(_field(usage, "prompt_tokens", "input_tokens")),
        cached_tokens=_count(
            _field(_field(usage, "prompt_tokens_details", "input_tokens_details"), "cached_tokens")
        ),
        output_tokens=_count(_field(usage, "completion_tokens", "output_tokens")),
        reasoning_tokens=_count(
            _field(
                _field(usage, "completion_tokens_details", "output_tokens_details"),
                "reasoning_tokens",
            )
        ),
    )


def _valid_utf8(body: bytes) -> bytes:
    """``body`` with invalid UTF-8 replaced by U+FFFD (the JSON decoder does not check the
    strings it skips), so that every line written is valid UTF-8."""
    if body.isascii():
        return body
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("utf-8", "replace").encode("utf-8")
    return body


def check_body(body: bytes) -> tuple[bytes, Usage] | None:
    """The body as one line of valid UTF-8 JSON and its usage, or None when it is not a JSON
    object (or cannot be read: nested too deeply for the decoder)."""
    body = _valid_utf8(body)
    try:
        parsed = _body_decoder.decode(body)
        if b"\n" in body or b"\r" in body:
            body = orjson.dumps(orjson.loads(body))
    except (*_DECODE_ERRORS, orjson.JSONDecodeError):
        return None
    return body, read_usage(parsed.usage)


def error_body(resp: UpstreamResponse) -> bytes:
    """A non-2xx body as one JSON line: as sent when it is JSON, else wrapped in an error."""
    checked = check_body(resp.body)
    if checked is not None:
        return checked[0]
    text = resp.body.decode("utf-8", "replace")[:2000]
    return orjson.dumps(openai_error(text or f"HTTP {resp.status_code}", "upstream_error"))


INVALID_BODY = orjson.dumps(
    openai_error(
        "The upstream answered with a body that is not a JSON object.",
        "upstream_error",
        code="invalid_upstream_response",
    )
)

# What the engine's senders get for one request: (succeeded, record line, usage).
Result = tuple[bool, bytes, Usage | None]


def answer_record(custom_id: bytes, resp: UpstreamResponse, started_at: float) -> Result:
    """``(succeeded, record, usage)`` for an upstream's final answer: a 2xx whose body is a
    JSON object succeeds with the body as sent; any other 2xx fails as a 502
    ``invalid_upstream_response``; a non-2xx fails with its body. ``custom_id`` is
    JSON-encoded; ``started_at``: unix seconds when the request was taken up. Never raises:
    whatever goes wrong with one answer fails that request."""
    try:
        if 200 <= resp.status_code < 300:
            checked = check_body(resp.body)
            if checked is not None:
                body, usage = checked
                line = answered(
                    custom_id, True, resp.status_code, resp.request_id, body, usage,
                    started_at, time.time(),
                )
                return True, line, usage
            line = answered(
                custom_id, False, 502, resp.request_id, INVALID_BODY, None,
                started_at, time.time(),
            )
            return False, line, None
        line = answered(
            custom_id, False, resp.status_code, resp.request_id, error_body(resp), None,
            started_at, time.time(),
        )
        return False, line, None
    except Exception as exc:
        log.exception("recording an upstream answer failed")
        return False, failure_record(
            custom_id, "internal_error", f"{type(exc).__name__}: {exc}", started_at
        ), None


def failure_record(custom_id: bytes, code: str, message: str, started_at: float) -> bytes:
    """The record of an executed request with no answer to pass on (no backend, invalid
    request, an internal error): outcome ``failed`` with ``error`` ``{code, message}``."""
    return unanswered(custom_id, code, message, started_at, time.time())
