"""Records as lines of OpenAI's batch output and error files (CONTRACT.md's shapes)::

    {"id","custom_id","response":{"status_code","request_id","body"},"error":null}
    {"id","custom_id","response":null,"error":{"code","message"}}

The first for every record with an upstream answer (succeeded, or failed with the upstream's
4xx/5xx), the second for one without. ``id`` is derived from the batch and the position
(:func:`batchd.results.record.line_id`), so every rendering of a result has the same id. The
body is spliced as stored: one formatting operation a line, no re-encoding.
"""

from __future__ import annotations

import msgspec
import orjson

from batchd.results.record import NULL, Record

_RESPONSE = (
    b'{"id":"batch_req_%s_%d","custom_id":%s,"response":{"status_code":%d,"request_id":%s,'
    b'"body":%s},"error":null}\n'
)
_ERROR = b'{"id":"batch_req_%s_%d","custom_id":%s,"response":null,"error":%s}\n'
_UNKNOWN = msgspec.Raw(
    orjson.dumps({"code": "internal_error", "message": "The request has no recorded result."})
)


class _Stored(msgspec.Struct):
    """A record line as the renderer reads it: the JSON it splices is kept as it is stored
    (no decoding and re-encoding of strings); the fields it does not need are skipped."""

    custom_id: msgspec.Raw
    outcome: str
    status_code: int | None = None
    request_id: msgspec.Raw = NULL
    error: msgspec.Raw = NULL
    body: msgspec.Raw = NULL


_stored_decoder = msgspec.json.Decoder(_Stored)


def _suffix(batch_id: str) -> bytes:
    return batch_id.removeprefix("batch_").encode()


def _line(suffix: bytes, pos: int, rec: _Stored) -> bytes:
    if rec.status_code is not None:
        return _RESPONSE % (suffix, pos, rec.custom_id, rec.status_code, rec.request_id, rec.body)
    return _ERROR % (suffix, pos, rec.custom_id, _UNKNOWN if rec.error == NULL else rec.error)


def openai_line(batch_id: str, pos: int, record: Record) -> bytes:
    """The OpenAI output (``record.succeeded``) or error file line of the result at ``pos``
    of ``batch_id``: one line of UTF-8 JSON ending in ``\\n``."""
    stored = _Stored(
        msgspec.Raw(orjson.dumps(record.custom_id)),
        record.outcome,
        record.status_code,
        msgspec.Raw(orjson.dumps(record.request_id)),
        msgspec.Raw(msgspec.json.encode(record.error)),
        record.body,
    )
    return _line(_suffix(batch_id), pos, stored)


def render_part(batch_id: str, first_pos: int, data: bytes) -> tuple[bytes, bytes, int, int]:
    """A part blob's records (positions from ``first_pos``) as ``(output lines, error lines,
    output count, error count)``: succeeded records go to the output file, the rest to the
    error file."""
    suffix = _suffix(batch_id)
    out: list[bytes] = []
    err: list[bytes] = []
    for pos, rec in enumerate(_stored_decoder.decode_lines(data), first_pos):
        (out if rec.outcome == "succeeded" else err).append(_line(suffix, pos, rec))
    return b"".join(out), b"".join(err), len(out), len(err)
