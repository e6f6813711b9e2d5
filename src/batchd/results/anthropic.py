"""Records as Anthropic Message Batches result lines (the ``anthropic`` SDK's
``MessageBatchIndividualResponse``): ``{"custom_id", "result": {"type", "message"|"error"}}``.

The batch's endpoint tells the shape of a succeeded body: a ``/v1/chat/completions`` body is
translated to a Message (:func:`batchd.service.messages_format.message_of`); a
``/v1/messages`` body is a Message already and passes through.
"""

from __future__ import annotations

from typing import Any

import orjson

from batchd.envelopes import ANTHROPIC_TYPES, anthropic_error, anthropic_error_type
from batchd.models import MESSAGES_ENDPOINT
from batchd.results.record import CANCELLED, EXPIRED, Record
from batchd.service.messages_format import message_of

# Inside a result line the SDK parses ``error.error`` as one of these only (its
# ``ErrorObject`` union): ``api_error`` included, ``request_too_large`` not.
RESULT_ERROR_TYPES = frozenset(ANTHROPIC_TYPES.values()) - {"request_too_large"} | {"api_error"}


def errored(
    custom_id: str, status: int, message: str, kind: str | None = None
) -> dict[str, Any]:
    """A request's ``errored`` result with Anthropic's error envelope. ``kind``: the error
    type an Anthropic upstream named, kept when a result line may carry it (the SDK's
    ``ErrorObject`` union); else the type of ``status``, or ``invalid_request_error``."""
    if kind not in RESULT_ERROR_TYPES:
        kind = anthropic_error_type(status)
        if kind not in RESULT_ERROR_TYPES:
            kind = "invalid_request_error"
    envelope = anthropic_error(message, kind)
    return {"custom_id": custom_id, "result": {"type": "errored", "error": envelope}}


def _body(record: Record) -> Any:
    try:
        return orjson.loads(bytes(record.body))
    except orjson.JSONDecodeError:
        return None


def anthropic_line(record: Record, endpoint: str, message_id: str) -> dict[str, Any]:
    """The result line of ``record`` in a batch of ``endpoint``; ``message_id`` names the
    Message a translated (chat completions) answer becomes. Cancelled and expired requests
    are ``canceled`` / ``expired``; a request with no upstream answer is ``errored`` 500
    with its reason; an upstream's error answer is ``errored`` with its status and message."""
    custom_id = record.custom_id or ""
    if record.outcome == CANCELLED:
        return {"custom_id": custom_id, "result": {"type": "canceled"}}
    if record.outcome == EXPIRED:
        return {"custom_id": custom_id, "result": {"type": "expired"}}
    status = record.status_code
    if status is None:
        why = record.error.message if record.error else "The request was not run."
        return errored(custom_id, 500, why)
    body = _body(record)
    if record.succeeded:
        if endpoint == MESSAGES_ENDPOINT:
            message = body if isinstance(body, dict) else {}
        else:
            message = message_of(body, message_id)
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}
    err = body.get("error") if isinstance(body, dict) else None
    text = err.get("message") if isinstance(err, dict) else None
    why = str(text or f"The model server answered {status}.")
    kind = err.get("type") if endpoint == MESSAGES_ENDPOINT and isinstance(err, dict) else None
    return errored(custom_id, status, why, kind if isinstance(kind, str) else None)
