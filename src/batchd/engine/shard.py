"""Running one leased shard: dispatch its lines, journal results, checkpoint them.

The done-bitmap and the part holding the matching results are stored in one transaction,
fenced by the lease token; a worker that took over skips every line whose bit is set. A
result is journaled locally the moment it arrives, so a takeover on the same machine adopts
it instead of sending the request again: after ``kill -9`` at most what was in flight is
re-sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import msgspec

from batchd.backends.base import Backend, BackendUnavailable, UpstreamResponse
from batchd.blobs.base import Blobs
from batchd.blobs.keys import part_key
from batchd.engine.checkpoints import Checkpointer, Outcome, Taken
from batchd.engine.journal import Journal, read_journals
from batchd.engine.limits import DeploymentLimiter
from batchd.engine.retry import Parked, RetryPolicy, send_with_retries
from batchd.errors import LeaseLost
from batchd.models import Part, ShardClaim, Usage
from batchd.results.answer import Result, answer_record, failure_record
from batchd.results.record import SUCCEEDED
from batchd.results.record import decode as decode_record
from batchd.service.input_line import (
    DECODE_ERRORS,
    estimate_tokens,
    head_decoder,
    issue_param,
    line_decoder,
)
from batchd.store.protocols import QueueStore
from batchd.telemetry.logs import about
from batchd.telemetry.meters import DeploymentMeter
from batchd.tokens import RequestTokens

if TYPE_CHECKING:
    from batchd.engine.content_filter import ContentFilter

log = logging.getLogger(__name__)


class _CustomId(msgspec.Struct):
    custom_id: Any = None


_custom_id_decoder = msgspec.json.Decoder(_CustomId)


@dataclass(frozen=True, slots=True)
class Request:
    custom_id: bytes  # JSON-encoded
    body: bytes
    model: str
    tokens: int  # estimate for tokens-per-minute limits
    problem: str | None = None  # why the line cannot be sent (it goes to the error file)


def _unreadable(raw: bytes, exc: BaseException) -> Request:
    """A line the engine cannot read. Validation reads lines with the same decoder, so this
    does not happen to a validated file; if it does, that one line fails, not its shard."""
    try:
        cid: Any = _custom_id_decoder.decode(raw).custom_id
    except DECODE_ERRORS:
        cid = None
    if isinstance(exc, msgspec.ValidationError):
        param, reason = issue_param(exc)
        problem = f"{param}: {reason}"
    else:
        problem = f"The line could not be read: {type(exc).__name__}"
    return Request(msgspec.json.encode(cid if isinstance(cid, str) else None), b"", "", 0, problem)


@dataclass(frozen=True, slots=True)
class Route:
    backend: Backend
    limiter: DeploymentLimiter
    timeout: float
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    meter: DeploymentMeter = field(default_factory=lambda: DeploymentMeter(""))

    async def send(
        self,
        endpoint: str,
        body: bytes,
        tokens: int,
        project: str,
        batch: str,
        time_limit: float,
    ) -> UpstreamResponse:
        """One attempt, holding one of the deployment's slots for its length (taken per
        request, fairly between the projects and batches that wait for one)."""
        limiter = self.limiter
        if not limiter.try_acquire(project, batch):
            await limiter.acquire(tokens, project, batch)
        if limiter.paused_until and limiter.pause_left() > 0:
            limiter.release(project, batch)
            return _paused(limiter)
        if limiter.adaptive is not None:
            return await self._send_measured(endpoint, body, project, batch, time_limit)
        try:
            return await self.meter.send(self.backend, endpoint, body, time_limit)
        finally:
            limiter.release(project, batch)

    async def _send_measured(
        self, endpoint: str, body: bytes, project: str, batch: str, time_limit: float
    ) -> UpstreamResponse:
        """The rest of :meth:`send` for an adaptive limit (the slot is held): each answer's
        latency and status feed the limit."""
        limiter = self.limiter
        in_flight = limiter.in_flight
        started = time.monotonic()
        status = 0
        try:
            resp = await self.meter.send(self.backend, endpoint, body, time_limit)
            status = resp.status_code
            return resp
        finally:
            limiter.release(project, batch)
            limiter.on_answer(time.monotonic() - started, status, in_flight)


def _paused(limiter: DeploymentLimiter) -> UpstreamResponse:
    """The answer for a request whose slot came while the deployment is paused: not sent;
    a 429 with the pause's ``retry-after``, so the retry policy waits it out (or parks)."""
    return UpstreamResponse(429, b"", "", limiter.pause_left())


def parse_span(data: bytes, count: int, tokens_of: RequestTokens | None = None) -> list[Request]:
    """The shard's requests, in order (blank lines skipped, as validation did), read with
    validation's decoders (:mod:`batchd.service.input_line`). ``tokens_of(model, body,
    head)``: a request's tokens for the tpm limit (default: ``estimate_tokens``)."""
    out: list[Request] = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            line = line_decoder.decode(raw)
            head = head_decoder.decode(line.body)
        except DECODE_ERRORS as exc:
            out.append(_unreadable(raw, exc))
            continue
        out.append(
            Request(
                # msgspec's bytes are sized to fit; orjson's keep a 4 KiB buffer each
                msgspec.json.encode(line.custom_id),
                bytes(line.body),
                head.model,
                tokens_of(head.model, bytes(line.body), head)
                if tokens_of is not None
                else estimate_tokens(len(line.body), head),
            )
        )
    if len(out) != count:
        raise ValueError(f"shard has {len(out)} lines where validation counted {count}")
    return out


def _bit(bitmap: bytearray | bytes, i: int) -> bool:
    return bool(bitmap[i >> 3] & (1 << (i & 7)))


@dataclass
class ShardRun:
    claim: ShardClaim
    store: QueueStore
    blobs: Blobs
    spool: Path
    routes: dict[str, Route]
    checkpoint_seconds: float
    cancel_grace: float
    # The process's checkpointer (one transaction a round for all its shards); a run without
    # one checkpoints on its own, every ``checkpoint_seconds``.
    checkpointer: Checkpointer | None = None
    # ``[content_filter]``: None when off, and then the senders never look at it again.
    content_filter: ContentFilter | None = None
    # Counts a request's tokens for a deployment with a tpm limit (None: none has one).
    tokens_of: RequestTokens | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_code: str = "batch_cancelled"
    lost: bool = False
    released: bool = False  # a checkpoint ended the lease (shard done, or the final one)
    # The deployment asked for a pause past ``park_after``: the shard lets go of its lease
    # until then (unix seconds), so that it holds nothing another batch could use.
    park_until: float = 0.0
    _done: bytearray = field(default_factory=bytearray)
    _records: list[bytes] = field(default_factory=list)  # result records since the checkpoint
    _out: int = 0  # how many of them succeeded
    _usage: Usage = field(default_factory=Usage)
    _seq: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.claim.batch_id, self.claim.idx

    def request_stop(self, code: str) -> None:
        self.stop_code = code
        self.stop.set()

    # -- results -----------------------------------------------------------------------
    def _record(self, i: int, succeeded: bool, record: bytes, usage: Usage | None) -> None:
        self._done[i >> 3] |= 1 << (i & 7)
        self._records.append(record)
        if succeeded:
            self._out += 1
        if usage is not None:
            self._usage.add(usage)

    # -- checkpoints (run by the Checkpointer, under its lock) ---------------------------------
    def take(self, *, final: bool) -> Taken | None:
        """The results gathered since the last checkpoint, with the done-bitmap that matches
        them; None when there is nothing to store."""
        records = self._records
        if not records and (not final or self.released):
            return None
        done = bytes(self._done)
        taken = Taken(
            records,
            self._out,
            len(records) - self._out,
            self._usage,
            done,
            self._seq,
            shard_done=int.from_bytes(done, "little").bit_count() == self.claim.span.count,
        )
        self._records, self._out, self._usage = [], 0, Usage()
        return taken

    def put_back(self, taken: Taken) -> None:
        """A checkpoint failed before its commit: its results go with the next one."""
        self._records = taken.records + self._records
        self._out += taken.out
        self._usage.add(taken.usage)
        self._seq = taken.seq

    async def write_part(self, taken: Taken) -> Part | None:
        if not taken.records:
            return None
        c = self.claim
        self._seq = seq = taken.seq + 1
        key = part_key(c.batch_id, c.idx, c.token, seq)
        await self.blobs.put(key, b"".join(taken.records))
        return Part(c.batch_id, c.idx, seq, key, taken.out, taken.err)

    def settle(self, outcome: Outcome) -> None:
        """Act on a committed checkpoint's outcome: a lost lease stops the shard (nothing
        more of it can be stored); a released lease is not released again."""
        if outcome is Outcome.LEASE_LOST:
            if not self.lost:
                log.warning(
                    "shard %s/%d: lease lost; its checkpoint was refused",
                    *self.key,
                    extra=about(self.claim),
                )
            self.lost = True
            self.request_stop("batch_cancelled")
        elif outcome is Outcome.RELEASED:
            self.released = True  # the store holds no lease of it any more

    async def checkpoint(self, *, final: bool = False) -> None:
        """Store the results gathered since the last checkpoint now (``final``: and release
        the lease). Raises :class:`LeaseLost` when the store refused it."""
        checkpointer = self.checkpointer or Checkpointer(self.store, self.checkpoint_seconds)
        await checkpointer.checkpoint([self], final=final)
        if self.lost:
            raise LeaseLost(f"shard {self.claim.batch_id}/{self.claim.idx} was taken over")

    # -- the run ---------------------------------------------------------------------------
    async def _adopt(self) -> None:
        """Take over results journaled by earlier holders of this shard on this machine."""
        records = await anyio.to_thread.run_sync(
            lambda: list(
                read_journals(self.spool, self.claim.batch_id, self.claim.idx, self.claim.token)
            )
        )
        adopted = 0
        for i, line in records:
            if i < self.claim.span.count and not _bit(self._done, i):
                try:
                    rec = decode_record(line)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # not a whole record: the request is sent again
                succeeded = rec.outcome == SUCCEEDED
                self._record(i, succeeded, line, rec.tokens() if succeeded else None)
                adopted += 1
        if adopted:
            log.info(
                "shard %s/%d: adopted %d journaled results",
                *self.key,
                adopted,
                extra=about(self.claim),
            )

    async def run(self) -> None:
        c = self.claim
        self._done = bytearray(c.done)
        self._seq = c.part_seq
        data = await self.blobs.read_all(c.input_blob_key, c.span.start, c.span.end)
        requests = await anyio.to_thread.run_sync(parse_span, data, c.span.count, self.tokens_of)
        del data
        await self._adopt()
        journal = Journal(self.spool, c.batch_id, c.idx, c.token)
        await journal.open()
        own = self.checkpointer is None
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(self.store, self.checkpoint_seconds)
        checkpointer = self.checkpointer
        checkpointer.add(self)
        todo = [(i, req) for i, req in enumerate(requests) if not _bit(self._done, i)]
        window = max((r.limiter.max_concurrency for r in self.routes.values()), default=64)
        lines = iter(todo)
        # A fixed set of senders pulls lines from one iterator: no task, callback or gate per
        # request, and at most ``window`` requests of this shard in flight.
        loop = asyncio.get_running_loop()
        tasks = {
            loop.create_task(self._sender(lines, journal)) for _ in range(min(window, len(todo)))
        }
        try:
            if tasks:
                await self._drain(tasks)
        finally:
            checkpointer.discard(self)
            if own:
                await checkpointer.close()
            for t in tasks:
                t.cancel()
            await journal.close()
        if not self.lost:
            await self.checkpoint(final=True)

    def park(self, until: float) -> None:
        """Stop dispatching: the shard is stored and released, not claimed before ``until``."""
        if until > self.park_until:
            self.park_until = until
        self.stop.set()

    async def _sender(self, lines: Iterator[tuple[int, Request]], journal: Journal) -> None:
        stop = self.stop
        execute = self._execute if self.content_filter is None else self._execute_filtered
        for i, req in lines:
            if stop.is_set():
                return
            started = time.time()
            try:
                result = await execute(req, started)
            except Exception as exc:
                # A defect, not the line's doing: that line fails, the shard goes on.
                log.exception("shard %s/%d: line %d failed", *self.key, i, extra=about(self.claim))
                failed = failure_record(req.custom_id, "internal_error", repr(exc), started)
                result = (False, failed, None)
            if result is None:
                continue  # stopped or past the deadline: left undone for the finaliser
            if isinstance(result, Parked):
                self.park(result.until)  # left undone: sent after the pause
                return
            succeeded, record, usage = result
            # In the journal before it counts as done (see the module's docstring).
            journal.append(i, record)
            self._record(i, succeeded, record, usage)

    async def _execute(self, req: Request, started: float) -> Result | Parked | None:
        """One line, from its request to its result record (or why it has none yet);
        ``started``: unix seconds when it was taken up."""
        if req.problem is not None:
            return False, failure_record(
                req.custom_id, "invalid_request", req.problem, started
            ), None
        route = self.routes.get(req.model)
        if route is None:
            message = f"No deployment serves the model {req.model!r}."
            return False, failure_record(req.custom_id, "model_not_found", message, started), None
        try:
            resp = await send_with_retries(
                route.send,
                self.claim.endpoint,
                req.body,
                req.tokens,
                self.claim.project,
                self.claim.batch_id,
                deployment=route.limiter,
                deadline=float(self.claim.expires_at),
                stop=self.stop,
                time_limit=route.timeout,
                policy=route.policy,
                on_retry=route.meter.retry,
            )
        except BackendUnavailable as exc:
            return False, failure_record(
                req.custom_id, "backend_unavailable", str(exc), started
            ), None
        if resp is None or isinstance(resp, Parked):
            return resp
        result = answer_record(req.custom_id, resp, started)
        route.meter.tokens(result[2])
        return result

    async def _execute_filtered(self, req: Request, started: float) -> Result | Parked | None:
        """:meth:`_execute` inside the content filter (:mod:`batchd.engine.content_filter`)."""
        assert self.content_filter is not None
        if req.problem is not None:
            return await self._execute(req, started)
        return await self.content_filter.execute(
            lambda: self._execute(req, started),
            self.claim.endpoint,
            req.custom_id,
            req.body,
            started,
        )

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        """Wait for in-flight requests; once stopped, give them a bounded grace."""
        loop = asyncio.get_running_loop()
        gathered: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
        stopper: asyncio.Future[Any] = loop.create_task(self.stop.wait())
        await asyncio.wait([gathered, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            await asyncio.wait({gathered}, timeout=self.cancel_grace)
        stopper.cancel()
        if not gathered.done():
            gathered.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gathered
