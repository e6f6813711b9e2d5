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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import orjson

from batchd.backends.base import Backend, BackendUnavailable, UpstreamResponse
from batchd.blobs.base import Blobs
from batchd.engine.checkpoints import Checkpointer, Taken
from batchd.engine.journal import Journal, read_journals
from batchd.engine.limits import DeploymentLimiter
from batchd.engine.results import (
    check_body,
    error_body,
    error_line,
    response_line,
    usage_of_line,
)
from batchd.engine.retry import send_with_retries
from batchd.errors import LeaseLost
from batchd.models import Part, ShardClaim, Usage
from batchd.store.sql import Store

log = logging.getLogger(__name__)


class _Line(msgspec.Struct):
    custom_id: str
    body: msgspec.Raw


class _Head(msgspec.Struct):
    model: str = ""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


_line_decoder = msgspec.json.Decoder(_Line)
_head_decoder = msgspec.json.Decoder(_Head)


@dataclass(frozen=True, slots=True)
class Request:
    custom_id: bytes  # JSON-encoded
    body: bytes
    model: str
    tokens: int  # estimate for tokens-per-minute limits


@dataclass(frozen=True, slots=True)
class Route:
    backend: Backend
    limiter: DeploymentLimiter
    timeout: float

    async def send(
        self, endpoint: str, body: bytes, tokens: int, time_limit: float
    ) -> UpstreamResponse:
        """One attempt, holding one of the deployment's slots for its length."""
        limiter = self.limiter
        if not limiter.try_acquire():
            await limiter.acquire(tokens)
        try:
            return await self.backend.send(endpoint, body, time_limit=time_limit)
        finally:
            limiter.release()


def parse_span(data: bytes, count: int) -> list[Request]:
    """The shard's requests, in order (blank lines skipped, as validation did)."""
    out: list[Request] = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        line = _line_decoder.decode(raw)
        head = _head_decoder.decode(line.body)
        out_tokens = head.max_completion_tokens or head.max_tokens or 0
        out.append(
            Request(
                # msgspec's bytes are sized to fit; orjson's keep a 4 KiB buffer each
                msgspec.json.encode(line.custom_id),
                bytes(line.body),
                head.model,
                len(line.body) // 4 + out_tokens,
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
    store: Store
    blobs: Blobs
    spool: Path
    routes: dict[str, Route]
    checkpoint_seconds: float
    cancel_grace: float
    # The process's checkpointer (one transaction a round for all its shards); a run without
    # one checkpoints on its own, every ``checkpoint_seconds``.
    checkpointer: Checkpointer | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_code: str = "batch_cancelled"
    lost: bool = False
    released: bool = False  # a checkpoint ended the lease (shard done, or the final one)
    _done: bytearray = field(default_factory=bytearray)
    _out: list[bytes] = field(default_factory=list)
    _err: list[bytes] = field(default_factory=list)
    _usage: Usage = field(default_factory=Usage)
    _seq: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.claim.batch_id, self.claim.idx

    def request_stop(self, code: str) -> None:
        self.stop_code = code
        self.stop.set()

    # -- results -----------------------------------------------------------------------
    def _record(self, i: int, is_output: bool, line: bytes, usage: Usage | None) -> None:
        self._done[i >> 3] |= 1 << (i & 7)
        (self._out if is_output else self._err).append(line)
        if usage is not None:
            self._usage.add(usage)

    def _result(self, req: Request, resp: UpstreamResponse) -> tuple[bool, bytes, Usage | None]:
        if 200 <= resp.status_code < 300:
            checked = check_body(resp.body)
            if checked is not None:
                body, usage = checked
                return True, response_line(req.custom_id, resp, body), usage
            bad = UpstreamResponse(
                502,
                orjson.dumps(
                    {
                        "error": {
                            "message": "The upstream answered with a body that is not "
                            "a JSON object.",
                            "type": "upstream_error",
                            "param": None,
                            "code": "invalid_upstream_response",
                        }
                    }
                ),
                resp.request_id,
            )
            return False, response_line(req.custom_id, bad, bad.body), None
        return False, response_line(req.custom_id, resp, error_body(resp)), None

    # -- checkpoints (run by the Checkpointer, under its lock) ---------------------------------
    def take(self, *, final: bool) -> Taken | None:
        """The results gathered since the last checkpoint, with the done-bitmap that matches
        them; None when there is nothing to store."""
        out, err = self._out, self._err
        if not out and not err and (not final or self.released):
            return None
        done = bytes(self._done)
        taken = Taken(
            out,
            err,
            self._usage,
            done,
            self._seq,
            shard_done=int.from_bytes(done, "little").bit_count() == self.claim.span.count,
        )
        self._out, self._err, self._usage = [], [], Usage()
        return taken

    def put_back(self, taken: Taken) -> None:
        """A checkpoint failed before its commit: its results go with the next one."""
        self._out = taken.out + self._out
        self._err = taken.err + self._err
        self._usage.add(taken.usage)
        self._seq = taken.seq

    async def write_part(self, taken: Taken) -> Part | None:
        if not taken.out and not taken.err:
            return None
        c = self.claim
        self._seq = seq = taken.seq + 1
        base = f"parts/{c.batch_id}/{c.idx:06d}.{c.token}.{seq}"
        out_key = base + ".out" if taken.out else None
        err_key = base + ".err" if taken.err else None
        if out_key:
            await self.blobs.put(out_key, b"".join(taken.out))
        if err_key:
            await self.blobs.put(err_key, b"".join(taken.err))
        return Part(c.batch_id, c.idx, seq, out_key, err_key, len(taken.out), len(taken.err))

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
        for i, is_output, line in records:
            if i < self.claim.span.count and not _bit(self._done, i):
                self._record(i, is_output, line, usage_of_line(line) if is_output else None)
                adopted += 1
        if adopted:
            log.info("shard %s/%d: adopted %d journaled results", *self.key, adopted)

    async def run(self) -> None:
        c = self.claim
        self._done = bytearray(c.done)
        self._seq = c.part_seq
        data = await self.blobs.read_all(c.input_blob_key, c.span.start, c.span.end)
        requests = await anyio.to_thread.run_sync(parse_span, data, c.span.count)
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

    async def _sender(self, lines: Iterator[tuple[int, Request]], journal: Journal) -> None:
        stop = self.stop
        routes = self.routes
        endpoint = self.claim.endpoint
        deadline = float(self.claim.expires_at)
        for i, req in lines:
            if stop.is_set():
                return
            try:
                route = routes.get(req.model)
                if route is None:
                    line = error_line(
                        req.custom_id,
                        "model_not_found",
                        f"No deployment serves the model {req.model!r}.",
                    )
                    journal.append(i, False, line)
                    self._record(i, False, line, None)
                    continue
                try:
                    resp = await send_with_retries(
                        route.send,
                        endpoint,
                        req.body,
                        req.tokens,
                        deadline=deadline,
                        stop=stop,
                        time_limit=route.timeout,
                    )
                except BackendUnavailable as exc:
                    line = error_line(req.custom_id, "backend_unavailable", str(exc))
                    journal.append(i, False, line)
                    self._record(i, False, line, None)
                    continue
                if resp is None:
                    continue  # stopped or past the deadline: left undone for the finaliser
                is_output, line, usage = self._result(req, resp)
                # In the journal before it counts as done (see the module's docstring).
                journal.append(i, is_output, line)
                self._record(i, is_output, line, usage)
            except Exception:
                # Left undone: the shard is released and the line is tried again later.
                log.exception("shard %s/%d: line %d failed", *self.key, i)

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
