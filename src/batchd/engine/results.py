"""Result lines of the output and error files, built from bytes.

A 2xx body is placed in the output line exactly as the upstream sent it (no parse and
dump), after one check that it is a single line of valid JSON; its ``usage`` is read with a
decoder that skips everything else.
"""

from __future__ import annotations

import itertools
import os

import msgspec
import orjson

from batchd.backends.base import UpstreamResponse
from batchd.models import Usage


class _Details(msgspec.Struct):
    cached_tokens: int = 0
    reasoning_tokens: int = 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None


class _Body(msgspec.Struct):
    usage: _Usage | None = None


class _Response(msgspec.Struct):
    body: _Body | None = None


class _OutputLine(msgspec.Struct):
    response: _Response | None = None


_body_decoder = msgspec.json.Decoder(_Body)
_line_decoder = msgspec.json.Decoder(_OutputLine)


def _usage(u: _Usage | None) -> Usage:
    if u is None:
        return Usage()
    cached = (u.prompt_tokens_details or u.input_tokens_details or _Details()).cached_tokens
    reasoning = (
        u.completion_tokens_details or u.output_tokens_details or _Details()
    ).reasoning_tokens
    return Usage(
        input_tokens=u.prompt_tokens or u.input_tokens,
        cached_tokens=cached or 0,
        output_tokens=u.completion_tokens or u.output_tokens,
        reasoning_tokens=reasoning or 0,
    )


def check_body(body: bytes) -> tuple[bytes, Usage] | None:
    """The body as one JSON line and its usage, or None when it is not a JSON object."""
    try:
        parsed = _body_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if b"\n" in body or b"\r" in body:
        body = orjson.dumps(orjson.loads(body))
    return body, _usage(parsed.usage)


def usage_of_line(line: bytes) -> Usage:
    """The usage recorded in an output line (for results recovered from a journal)."""
    try:
        parsed = _line_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Usage()
    if parsed.response is None or parsed.response.body is None:
        return Usage()
    return _usage(parsed.response.body.usage)


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
