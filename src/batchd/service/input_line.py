"""The one schema of a batch input line, as validation, the token estimate and the engine read it.

An input line is ``{"custom_id": str, "method": "POST", "url": str, "body": {...}}``
(OpenAI's Batch API input format). batchd reads a few fields of ``body`` itself: they are
typed here as the ``openai`` SDK's request params type them (``model: str``,
``max_tokens: Optional[int]``, ...), with the ranges OpenAI's API enforces (token limits
1..2**31-1, ``n`` 1..128). Every other field of ``body`` is passed to the upstream untouched,
as the bytes the user wrote.

Validation and the engine decode with the same :data:`head_decoder`, so the engine never
meets a line that validation accepted but it cannot read. Decoding raises
:class:`msgspec.ValidationError` for a field of the wrong type or range (its message names the
field: :func:`issue_param` turns it into ``body.<field>``), :class:`msgspec.DecodeError` for
a body that is not JSON, and :class:`RecursionError` for JSON nested too deeply (msgspec's
decoder recurses once per level): callers catch :data:`DECODE_ERRORS`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

MAX_TOKENS_LIMIT = 2**31 - 1
MAX_N = 128  # OpenAI's upper bound for ``n``

TokenCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


class RequestHead(msgspec.Struct):
    """The fields of a request ``body`` that batchd reads, typed; the rest is skipped.

    ``stream`` is left untyped: any value but ``null``/``false`` is ``streaming_unsupported``,
    a more useful message than a type error."""

    model: NonEmpty
    stream: Any = None
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None  # chat completions
    max_output_tokens: TokenCount | None = None  # responses
    n: ChoiceCount | None = None


class LooseHead(msgspec.Struct):
    """The same fields untyped: what the precise path of validation reads to word an issue."""

    model: Any = None
    stream: Any = None


class LineHead(msgspec.Struct):
    """The line itself, ``body`` kept as the raw bytes the user wrote."""

    custom_id: str
    body: msgspec.Raw


head_decoder = msgspec.json.Decoder(RequestHead)
loose_head_decoder = msgspec.json.Decoder(LooseHead)
line_decoder = msgspec.json.Decoder(LineHead)

_AT = re.compile(r" - at `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)`$")


def issue_param(exc: msgspec.ValidationError, prefix: str = "body") -> tuple[str, str]:
    """``(param, reason)`` of a validation error: ``("body.max_tokens", "Expected `int` <=
    2147483647")``. An error with no path names ``prefix`` itself."""
    text = str(exc)
    m = _AT.search(text)
    if m is None:
        return prefix, text
    return prefix + m.group(1), text[: m.start()]


def estimate_tokens(body_bytes: int, head: RequestHead) -> int:
    """The tokens a request may use, for quotas and tokens-per-minute limits: its input as
    ``bytes / 4`` (OpenAI's rule of thumb for English text) plus the most output it allows
    (``max_completion_tokens``, else ``max_tokens``, else ``max_output_tokens``; times ``n``).
    Bounded: at most ``body_bytes / 4 + 128 * (2**31 - 1)``."""
    out = head.max_completion_tokens or head.max_tokens or head.max_output_tokens or 0
    return body_bytes // 4 + out * (head.n or 1)
