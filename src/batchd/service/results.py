"""Results while a batch runs (an extension beyond OpenAI and Azure).

A batch's results are readable as soon as they are committed (each checkpoint commits the
results that arrived since the last one), in one order fixed at commit: position 0, 1, 2...
(see :mod:`batchd.results.reader`). :meth:`ResultService.lines` gives them as OpenAI
output/error lines (JSONL, ``"\\n"``-ended, the same bytes as in the batch's files once it
ended), from a cursor, filtered by outcome; ``follow`` keeps reading until the batch has ended
and every result (the never-executed ones, committed when it ends, included) was given.

Cursor: a line's ``id`` (``batch_req_<batch id without "batch_">_<position>``) is the cursor
``after`` of the next read, so a reader that lost its connection starts again right after
the last line it got and sees every result once.

Following holds no database connection between polls: each poll is one read of the batch
row (:meth:`BatchStore.get_batch`); the results are read only when its counters
(``completed + failed``, the number of committed results) moved or the batch ended. Polls
come every :data:`POLL_MIN_SECONDS` while results keep coming (within
:data:`POLL_FAST_SECONDS` of the last), backing off to :data:`POLL_MAX_SECONDS` while none
come. While nothing is sent for
``limits.results_keepalive_seconds``, one space (``b" "``) is sent: JSON allows whitespace
before a value, so it becomes part of the next line (`` {"id": ...}``) and every line stays
one JSON value, while proxies that cut idle connections (nginx's ``proxy_read_timeout``,
load balancers' idle timeouts, 60 s by default) see bytes flowing. An empty line would not
be valid JSONL; a heartbeat object would not be a result. A stream that ends after
keep-alive spaces ends with those spaces (no line of its own).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Literal, Protocol

from batchd.blobs.base import Blobs
from batchd.errors import InvalidRequest, excerpt
from batchd.models import BatchRecord
from batchd.results.openai import openai_line
from batchd.results.reader import read_results
from batchd.results.record import Record, position_of
from batchd.store.protocols import BatchStore, QueueStore

Outcome = Literal["succeeded", "failed"]

POLL_MIN_SECONDS = 0.05  # between two polls of the batch row while results keep coming
POLL_FAST_SECONDS = 2.0  # ... and for this long after the last new result; then
POLL_BACKOFF = 1.5  # ... backing off (x1.5 a poll)
POLL_MAX_SECONDS = 1.0  # ... to this while none come
CHUNK_BYTES = 64 * 1024  # lines are sent in chunks of about this size, and at each pass's end
KEEPALIVE = b" "


class StreamGauge(Protocol):
    """What :class:`ResultService` tells about its followed streams (a Prometheus gauge)."""

    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


def cursor_of(batch: BatchRecord, after: str | None) -> int:
    """The position after which to read: -1 (from the start) for ``None`` or ``""``, else
    the position of line id ``after``. Raises :class:`InvalidRequest` (param ``after``) for
    a malformed id, one of another batch, or one past the batch's last request (positions
    run from 0 to ``total - 1``: a typo'd cursor would otherwise show nothing)."""
    if not after:
        return -1
    batch_id = batch.id
    pos = position_of(batch_id, after)
    if pos is not None and pos >= batch.total:
        raise InvalidRequest(
            f"after {excerpt(after)} is past the last result of batch "
            f"{excerpt(batch_id, quote=False)}, which has {batch.total} requests.",
            code="invalid_value",
            param="after",
        )
    if pos is None:
        raise InvalidRequest(
            f"after {excerpt(after)} is not the id of a result line of batch "
            f"{excerpt(batch_id, quote=False)} (ids look like 'batch_req_<batch>_<n>').",
            code="invalid_value",
            param="after",
        )
    return pos


class ResultService:
    """The committed results of a batch, as OpenAI lines. ``batches``: the batch rows a
    followed stream polls; ``queue``: where the results are committed; ``keepalive_seconds``:
    see the module docstring; ``streams``: told +1/-1 as a followed stream opens and closes
    (the ``batchd_results_streams`` gauge)."""

    def __init__(
        self,
        batches: BatchStore,
        queue: QueueStore,
        blobs: Blobs,
        *,
        keepalive_seconds: float,
        streams: StreamGauge | None = None,
    ) -> None:
        self._batches = batches
        self._queue = queue
        self._blobs = blobs
        self._keepalive = keepalive_seconds
        self._streams = streams
        self._closing = asyncio.Event()

    def close(self) -> None:
        """The server is shutting down: every followed stream ends at its next poll (within
        :data:`POLL_MAX_SECONDS`) instead of holding the shutdown up; a reader resumes after
        the last line it got (``after``), as after any stream that ends before its batch.
        Call on the event loop's thread."""
        self._closing.set()

    async def latest(self, batch: BatchRecord, count: int) -> list[tuple[int, Record]]:
        """The last ``count`` committed results of ``batch``, newest first."""
        top = batch.completed + batch.failed
        start = max(-1, top - count - 1)
        found = [r async for r in read_results(self._queue, self._blobs, batch.id, after=start)]
        return found[::-1][:count]

    async def lines(
        self,
        batch: BatchRecord,
        *,
        after: int = -1,
        outcome: Outcome | None = None,
        follow: bool = False,
    ) -> AsyncIterator[bytes]:
        """Chunks of whole OpenAI lines (and, when following, keep-alive spaces): the
        results of ``batch`` (a record the caller read, scoped to its project) with position
        > ``after`` committed so far; with ``follow``, then each one as it is committed,
        until the batch has ended and all are given (or the batch was deleted, or the server
        shuts down: :meth:`close`). Raises
        :class:`batchd.errors.BlobNotFound` when the batch's results are deleted while they
        are read (the stream breaks off rather than looking complete)."""
        if not follow:
            async for chunk in self._pass(batch.id, after, outcome, [after]):
                yield chunk
            return
        if self._streams is not None:
            self._streams.inc()
        try:
            async for chunk in self._follow(batch, after, outcome):
                yield chunk
        finally:
            if self._streams is not None:
                self._streams.dec()

    async def _pass(
        self, batch_id: str, after: int, outcome: Outcome | None, last: list[int]
    ) -> AsyncIterator[bytes]:
        """One read of the results after ``after``, in chunks; ``last[0]`` is set to the
        position of each line as it is given."""
        buf = bytearray()
        async for pos, record in read_results(
            self._queue, self._blobs, batch_id, after=after, outcome=outcome
        ):
            buf += openai_line(batch_id, pos, record)
            last[0] = pos
            if len(buf) >= CHUNK_BYTES:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)

    async def _closed_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True at once when the server is shutting down."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _follow(
        self, batch: BatchRecord, after: int, outcome: Outcome | None
    ) -> AsyncIterator[bytes]:
        # ``seen``: every position <= seen was read (and given when it matched ``outcome``).
        # Positions are given in commit order: when the batch row says ``n`` results are
        # committed, positions 0..n-1 are, so a read after ``seen`` misses none of them.
        seen = [after]
        rec: BatchRecord | None = batch
        delay = POLL_MIN_SECONDS
        quiet_since = moved_at = time.monotonic()
        while rec is not None:
            ended = rec.ended  # read before the results: a final pass sees every result
            committed = rec.completed + rec.failed - 1
            if ended or committed > seen[0]:
                async for chunk in self._pass(rec.id, seen[0], outcome, seen):
                    yield chunk
                    quiet_since = time.monotonic()
                seen[0] = max(seen[0], committed)
                delay, moved_at = POLL_MIN_SECONDS, time.monotonic()
            if ended:
                return
            now = time.monotonic()
            if now - quiet_since >= self._keepalive:
                yield KEEPALIVE
                quiet_since = now
            if await self._closed_within(min(delay, self._keepalive)):
                return
            if now - moved_at >= POLL_FAST_SECONDS:
                delay = min(delay * POLL_BACKOFF, POLL_MAX_SECONDS)
            rec = await self._batches.get_batch(batch.id)
