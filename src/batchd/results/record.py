"""The neutral result record: one JSON line a request, in the engine's journal and in the
part blobs (OpenAI/Anthropic-neutral; renderers turn it into either API's line).

Line (fields in this order; ``body`` last, spliced as received, never re-encoded)::

    {"custom_id": str|null, "outcome": "succeeded"|"failed"|"cancelled"|"expired",
     "status_code": int|null, "request_id": str|null, "error": {"code","message"}|null,
     "usage": [input, cached, output, reasoning], "started_at": float|null,
     "ended_at": float|null, "body": <JSON>|null}

``status_code``/``request_id``/``body``: the upstream's answer when there is one to pass on
(a failed 4xx/5xx too); ``error``: why there is none (``invalid_request``,
``model_not_found``, ``backend_unavailable``, ``batch_cancelled``, ``batch_expired``, ...).
``usage``: tokens read from a succeeded body (zeros otherwise). Times: unix seconds (to the
millisecond), null for a request never executed.

The engine writes lines with one formatting operation each (:func:`answered`,
:func:`unanswered`); :func:`decode_records` reads them with ``body`` as :class:`msgspec.Raw`.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import orjson

from batchd.models import Usage

Outcome = Literal["succeeded", "failed", "cancelled", "expired"]
SUCCEEDED: Outcome = "succeeded"
FAILED: Outcome = "failed"
CANCELLED: Outcome = "cancelled"
EXPIRED: Outcome = "expired"

NULL = msgspec.Raw(b"null")


class RecordError(msgspec.Struct, frozen=True):
    """Why a request has no upstream answer to pass on."""

    code: str
    message: str


class Record(msgspec.Struct, frozen=True):
    """One request's result (see the module docstring for the fields)."""

    custom_id: str | None
    outcome: Outcome
    status_code: int | None = None
    request_id: str | None = None
    error: RecordError | None = None
    usage: tuple[int, int, int, int] = (0, 0, 0, 0)
    started_at: float | None = None
    ended_at: float | None = None
    body: msgspec.Raw = NULL  # JSON bytes as received; ``null`` when there is none

    @property
    def succeeded(self) -> bool:
        return self.outcome == SUCCEEDED

    def tokens(self) -> Usage:
        i, c, o, r = self.usage
        return Usage(i, c, o, r)


_decoder = msgspec.json.Decoder(Record)
_encoder = msgspec.json.Encoder()

# One formatting operation a line on the engine's hot path. ``custom_id`` and ``request_id``
# are spliced JSON-encoded, ``body`` as one line of JSON.
_ANSWERED = (
    b'{"custom_id":%s,"outcome":"%s","status_code":%d,"request_id":%s,"error":null,'
    b'"usage":[%d,%d,%d,%d],"started_at":%.3f,"ended_at":%.3f,"body":%s}\n'
)
_UNANSWERED = (
    b'{"custom_id":%s,"outcome":"%s","status_code":null,"request_id":null,"error":%s,'
    b'"usage":[0,0,0,0],"started_at":%.3f,"ended_at":%.3f,"body":null}\n'
)
_NEVER_RUN = (
    b'{"custom_id":%s,"outcome":"%s","status_code":null,"request_id":null,"error":%s,'
    b'"usage":[0,0,0,0],"started_at":null,"ended_at":null,"body":null}\n'
)
_NO_USAGE = Usage()


def answered(
    custom_id: bytes,
    succeeded: bool,
    status_code: int,
    request_id: str | None,
    body: bytes,
    usage: Usage | None,
    started_at: float,
    ended_at: float,
) -> bytes:
    """The record line of an upstream's answer. ``custom_id`` is JSON-encoded; ``body`` is
    one line of valid UTF-8 JSON (see :func:`batchd.results.answer.check_body`)."""
    u = usage or _NO_USAGE
    return _ANSWERED % (
        custom_id,
        b"succeeded" if succeeded else b"failed",
        status_code,
        orjson.dumps(request_id),
        u.input_tokens,
        u.cached_tokens,
        u.output_tokens,
        u.reasoning_tokens,
        started_at,
        ended_at,
        body,
    )


def unanswered(
    custom_id: bytes,
    code: str,
    message: str,
    started_at: float | None = None,
    ended_at: float | None = None,
    outcome: Outcome = FAILED,
) -> bytes:
    """The record line of a request with no upstream answer to pass on (``error`` says why);
    times None: never executed (a ``cancelled`` or ``expired`` request)."""
    error = orjson.dumps({"code": code, "message": message})
    if started_at is None or ended_at is None:
        return _NEVER_RUN % (custom_id, outcome.encode(), error)
    return _UNANSWERED % (custom_id, outcome.encode(), error, started_at, ended_at)


def encode(record: Record) -> bytes:
    """A record as its line (for a record changed after it was built: the body is spliced
    as it is)."""
    return _encoder.encode(record) + b"\n"


def decode(line: bytes) -> Record:
    """One record line. Raises :class:`msgspec.DecodeError` / :class:`msgspec.ValidationError`."""
    return _decoder.decode(line)


def decode_records(data: bytes) -> list[Record]:
    """Every record of a part blob (newline-delimited records), in order."""
    return _decoder.decode_lines(data)


def line_id(batch_id: str, pos: int) -> str:
    """The id of the result at position ``pos`` of a batch, in every rendering:
    ``batch_req_<batch id without "batch_">_<pos>``."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{pos}"


# No batch has more results than this (a 64-bit store integer keeps ``pos + 1`` in range).
MAX_POSITION = 2**53


def position_of(batch_id: str, line_id: str) -> int | None:
    """The position a line id (:func:`line_id`) names in ``batch_id``; None when it is not
    one of this batch's ids."""
    prefix = f"batch_req_{batch_id.removeprefix('batch_')}_"
    if not line_id.startswith(prefix):
        return None
    digits = line_id[len(prefix) :]
    if not digits.isascii() or not digits.isdigit() or (digits[0] == "0" and digits != "0"):
        return None
    pos = int(digits)
    return pos if pos <= MAX_POSITION else None
