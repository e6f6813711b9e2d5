"""JSON request bodies (``POST /batches``): strict type, bounded size and nesting.

- ``Content-Type`` must be ``application/json`` (parameters such as ``charset=utf-8``
  allowed; RFC 8259 §11): any other type is a 400 ``invalid_content_type``.
- At most :data:`MAX_JSON_BODY` bytes: a ``Content-Length`` above it is refused before any
  byte is read, and a chunked body as soon as it passes it (413). The body is never read
  into memory past the limit.
- At most :data:`MAX_JSON_DEPTH` levels of ``[``/``{`` anywhere, ignored fields included:
  400 ``invalid_json`` (the decoder would otherwise recurse until ``RecursionError``).
  Counted in C-speed passes (strings removed by a regex, brackets kept by
  ``bytes.translate``, a running sum): ~5 ms for the worst body of the limit.
"""

from __future__ import annotations

import itertools
import re
from typing import TypeVar

import msgspec
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from batchd.errors import InvalidRequest, TooLarge

MAX_JSON_BODY = 128 * 1024
MAX_JSON_DEPTH = 64

T = TypeVar("T")

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_STEP = [0] * 256
for _b in b"[{":
    _STEP[_b] = 1
for _b in b"]}":
    _STEP[_b] = -1


def json_depth(data: bytes) -> int:
    """How deeply ``[``/``{`` nest in ``data`` (brackets inside strings not counted)."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def content_length(request: Request) -> int | None:
    """The request's ``Content-Length`` when it is a plain ASCII number of at most 18 digits."""
    value = request.headers.get("content-length")
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def check_json_type(content_type: str) -> None:
    ctype, _ = parse_options_header(content_type)
    if ctype != b"application/json":
        raise InvalidRequest(
            "This route takes a JSON body (Content-Type: application/json).",
            code="invalid_content_type",
        )


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refused with a 413 once it passes ``limit`` bytes."""
    length = content_length(request)
    too_large = TooLarge(f"The request body is larger than {limit} bytes.", code="body_too_large")
    if length is not None and length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def read_json(request: Request, decoder: msgspec.json.Decoder[T]) -> T:
    """The body decoded by ``decoder``, within the bounds above."""
    check_json_type(request.headers.get("content-type", ""))
    raw = await read_limited(request, MAX_JSON_BODY)
    return decode_json(raw, decoder)


def decode_json(raw: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise InvalidRequest(
            f"The JSON body nests deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json"
        )
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise InvalidRequest(
            f"The body is not a JSON object: {str(exc)[:200]}", code="invalid_json"
        ) from None
