"""Records as lines of OpenAI's batch output and error files (CONTRACT.md's shapes)::

    {"id","custom_id","response":{"status_code","request_id","body"},"error":null}
    {"id","custom_id","response":null,"error":{"code","message"}}

The first for every record with an upstream answer (succeeded, or failed with the upstream's
4xx/5xx), the second for one without. ``id`` is derived from the batch and the position
(:func:`batchd.results.record.line_id`), so every rendering of a result has the same id. The
body is spliced as stored: one formatting operation a line, no re-encoding.
"""

from __future__ import annotations

import orjson

from batchd.results.record import Record, RecordError, decode_records

_RESPONSE = (
    b'{"id":"batch_req_%s_%d","custom_id":%s,"response":{"status_code":%d,"request_id":%s,'
    b'"body":%s},"error":null}\n'
)
_ERROR = b'{"id":"batch_req_%s_%d","custom_id":%s,"response":null,"error":%s}\n'
_UNKNOWN = RecordError("internal_error", "The request has no recorded result.")


def _suffix(batch_id: str) -> bytes:
    return batch_id.removeprefix("batch_").encode()


def _line(suffix: bytes, pos: int, rec: Record) -> bytes:
    if rec.status_code is not None:
        return _RESPONSE % (
            suffix,
            pos,
            orjson.dumps(rec.custom_id),
            rec.status_code,
            orjson.dumps(rec.request_id),
            rec.body,
        )
    err = rec.error or _UNKNOWN
    return _ERROR % (
        suffix,
        pos,
        orjson.dumps(rec.custom_id),
        orjson.dumps({"code": err.code, "message": err.message}),
    )


def openai_line(batch_id: str, pos: int, record: Record) -> bytes:
    """The OpenAI output (``record.succeeded``) or error file line of the result at ``pos``
    of ``batch_id``: one line of UTF-8 JSON ending in ``\\n``."""
    return _line(_suffix(batch_id), pos, record)


def render_part(batch_id: str, first_pos: int, data: bytes) -> tuple[bytes, bytes, int, int]:
    """A part blob's records (positions from ``first_pos``) as ``(output lines, error lines,
    output count, error count)``: succeeded records go to the output file, the rest to the
    error file."""
    suffix = _suffix(batch_id)
    out: list[bytes] = []
    err: list[bytes] = []
    for pos, rec in enumerate(decode_records(data), first_pos):
        (out if rec.outcome == "succeeded" else err).append(_line(suffix, pos, rec))
    return b"".join(out), b"".join(err), len(out), len(err)
