"""Result lines of the output and error files, built from bytes.

A 2xx body is placed in the output line exactly as the upstream sent it (no parse and
dump), after one check that it is a single line of valid JSON; its ``usage`` is read with a
decoder that skips everything else.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Any

import msgspec
import orjson

from batchd.backends.base import UpstreamResponse
from batchd.models import Usage

log = logging.getLogger(__name__)


class _Body(msgspec.Struct):
    """What a result body must be (a JSON object) and the one field read from it. ``usage``
    is untyped: gateways send ``null`` details, floats or extra fields, and a body is never
    rejected for its usage (:func:`read_usage` reads it leniently)."""

    usage: Any = None


class _Response(msgspec.Struct):
    body: Any = None


class _OutputLine(msgspec.Struct):
    response: _Response | None = None


_body_decoder = msgspec.json.Decoder(_Body)
_line_decoder = msgspec.json.Decoder(_OutputLine)
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


def usage_of_line(line: bytes) -> Usage:
    """The usage recorded in an output line (for results recovered from a journal)."""
    try:
        parsed = _line_decoder.decode(line)
    except _DECODE_ERRORS:
        return Usage()
    if parsed.response is None:
        return Usage()
    return read_usage(_field(parsed.response.body, "usage"))


_ID_PREFIX = b'"batch_req_' + os.urandom(8).hex().encode()  # random for each process
_id_counter = itertools.count(1)


def _req_id() -> bytes:
    """Unique across processes (random prefix) and within one (a counter): no syscall a line."""
    return b"%s%016x\"" % (_ID_PREFIX, next(_id_counter))


def response_line(custom_id: bytes, resp: UpstreamResponse, body: bytes) -> bytes:
    """A line with the upstream's answer: output file for 2xx, error file otherwise.
    ``custom_id`` is already JSON-encoded; ``body`` is one line of JSON."""
    return _RESPONSE_LINE % (
        _ID_PREFIX,
        next(_id_counter),
        custom_id,
        resp.status_code,
        orjson.dumps(resp.request_id),
        body,
    )


# One formatting operation a line (the id is ``_req_id()`` written out).
_RESPONSE_LINE = (
    b'{"id":%s%016x","custom_id":%s,"response":{"status_code":%d,"request_id":%s,"body":%s},'
    b'"error":null}\n'
)


def error_body(resp: UpstreamResponse) -> bytes:
    """A non-2xx body as one JSON line: as sent when it is JSON, else wrapped in an error."""
    checked = check_body(resp.body)
    if checked is not None:
        return checked[0]
    text = resp.body.decode("utf-8", "replace")[:2000]
    return orjson.dumps(
        {
            "error": {
                "message": text or f"HTTP {resp.status_code}",
                "type": "upstream_error",
                "param": None,
                "code": None,
            }
        }
    )


_INVALID_BODY = orjson.dumps(
    {
        "error": {
            "message": "The upstream answered with a body that is not a JSON object.",
            "type": "upstream_error",
            "param": None,
            "code": "invalid_upstream_response",
        }
    }
)


def result_line(custom_id: bytes, resp: UpstreamResponse) -> tuple[bool, bytes, Usage | None]:
    """``(is_output, line, usage)`` for an upstream's final answer: a 2xx whose body is a
    JSON object goes to the output file as sent; any other 2xx is recorded in the error file
    as a 502 ``invalid_upstream_response``; a non-2xx goes to the error file with its body.
    Never raises: whatever goes wrong with one answer ends that line in the error file."""
    try:
        if 200 <= resp.status_code < 300:
            checked = check_body(resp.body)
            if checked is not None:
                body, usage = checked
                return True, response_line(custom_id, resp, body), usage
            bad = UpstreamResponse(502, _INVALID_BODY, resp.request_id)
            return False, response_line(custom_id, bad, _INVALID_BODY), None
        return False, response_line(custom_id, resp, error_body(resp)), None
    except Exception as exc:
        log.exception("recording an upstream answer failed")
        return False, error_line(custom_id, "internal_error", f"{type(exc).__name__}: {exc}"), None


def error_line(custom_id: bytes, code: str, message: str) -> bytes:
    """A request that got no answer to pass on: cancelled, expired, or no backend."""
    return b"".join(
        (
            b'{"id":',
            _req_id(),
            b',"custom_id":',
            custom_id,
            b',"response":null,"error":',
            orjson.dumps({"code": code, "message": message}),
            b"}\n",
        )
    )
