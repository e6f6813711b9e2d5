"""The engine's per-request and per-interval machinery without an upstream: the
process-wide checkpointer on the in-memory store, the deployment limiter's fast path and
the HTTP/1.1 client's header handling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from batchd.backends.http1 import _Conn
from batchd.blobs.local import LocalBlobs
from batchd.config import Deployment, Settings
from batchd.engine.checkpoints import Checkpointer, Outcome
from batchd.engine.limits import DeploymentLimiter
from batchd.engine.shard import ShardRun
from batchd.engine.worker import BUSY_POLL_FACTOR, Engine
from batchd.errors import BlobError, LeaseLost, StoreError
from batchd.models import IN_PROGRESS, Usage
from batchd.service.activation import Activator
from batchd.store.memory import MemoryQueueStore, memory_store
from batchd.store.memory_state import MemoryState
from batchd.store.protocols import ShardCheckpoint, Store
from tests.store_support import DEPLOYMENT, lines, make_batch

LEASE = 30.0


class RecordingQueue(MemoryQueueStore):
    """The in-memory work queue, keeping the checkpoints each transaction stored; ``fail``:
    how many transactions to refuse first with a StoreError (a database that is down)."""

    def __init__(self, state: MemoryState) -> None:
        super().__init__(state)
        self.calls: list[list[ShardCheckpoint]] = []
        self.fail = 0

    async def checkpoint_many(
        self, checkpoints: Sequence[ShardCheckpoint]
    ) -> list[tuple[str, int]]:
        if self.fail:
            self.fail -= 1
            raise StoreError("down")
        self.calls.append(list(checkpoints))
        return await super().checkpoint_many(checkpoints)


class FailingBlobs(LocalBlobs):
    """Local blobs whose writes fail while ``fail`` is set (a full disk)."""

    fail = False

    async def put(self, key: str, data: bytes) -> None:
        if self.fail:
            raise BlobError("no space")
        await super().put(key, data)


class Setup:
    """One in-memory store (``store``; its queue the recording ``queue``) and local blobs."""

    def __init__(self, tmp_path: Path) -> None:
        state = MemoryState()
        self.store: Store = memory_store(state)
        self.queue = RecordingQueue(state)
        self.blobs = FailingBlobs(tmp_path / "files")
        self.settings = Settings(data_dir=tmp_path, deployments=[DEPLOYMENT])
        self.spool = tmp_path / "spool"
        self.batch_id = ""

    async def runs(self, n_lines: int, shard_lines: int) -> list[ShardRun]:
        """A batch of ``n_lines`` lines started (shards of ``shard_lines``), every shard
        claimed by worker "w", and a run of each claim, by idx."""
        batch = await make_batch(
            self.store, self.blobs, lines(n_lines, "r"), shard_lines=shard_lines
        )
        await Activator(self.settings, self.store.files, self.store.batches).activate(batch)
        started = await self.store.batches.get_batch(batch.id)
        assert started is not None and started.status == IN_PROGRESS
        self.batch_id = batch.id
        claims = await self.queue.claim_shards("w", n_lines, time.time(), LEASE)
        assert [c.idx for c in claims] == list(range(-(-n_lines // shard_lines)))
        runs = []
        for claim in claims:
            run = ShardRun(
                claim=claim,
                store=self.queue,
                blobs=self.blobs,
                spool=self.spool,
                routes={},
                checkpoint_seconds=0.05,
                cancel_grace=0.1,
            )
            run._done = bytearray(claim.done)  # what ``run()`` starts from
            runs.append(run)
        return runs

    async def take_over(self, runs: Sequence[ShardRun], idx: int) -> None:
        """Another worker takes shard ``idx`` once its lease lapsed (the others renewed)."""
        held = [(r.claim.batch_id, r.claim.idx, r.claim.token) for r in runs if r.claim.idx != idx]
        t = time.time()
        assert await self.queue.renew_leases("w", held, t + 10 * LEASE) == []
        [taken] = await self.queue.claim_shards("other", 1, t + 2 * LEASE, LEASE)
        assert (taken.idx, taken.token) == (idx, runs[idx].claim.token + 1)

    async def parts(self) -> list[tuple[int, int, int, int, int]]:
        """The batch's committed parts: (shard, seq, first position, out, err)."""
        found = await self.store.queue.result_parts(self.batch_id)
        return [(p.shard_idx, p.seq, p.first_pos, p.out_lines, p.err_lines) for p in found]

    async def done(self) -> list[bytes]:
        """Each shard's done-bitmap, by idx."""
        return [done for _, _, done in await self.store.queue.batch_shards(self.batch_id)]

    async def counters(self) -> tuple[int, int, Usage]:
        rec = await self.store.batches.get_batch(self.batch_id)
        assert rec is not None
        return rec.completed, rec.failed, rec.usage


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def result(run: ShardRun, i: int, ok: bool = True) -> None:
    run._record(i, ok, b'{"line":%d}\n' % i, Usage(1, 0, 2, 0) if ok else None)


async def test_one_transaction_for_all_shards_with_new_results(setup: Setup) -> None:
    cp = Checkpointer(setup.queue, 10)
    runs = await setup.runs(12, 4)
    result(runs[0], 0)
    result(runs[0], 1, ok=False)
    result(runs[2], 3)
    await cp.checkpoint(runs)
    assert len(setup.queue.calls) == 1 and cp.rounds == 1
    entries = setup.queue.calls[0]
    assert [e.claim.idx for e in entries] == [0, 2]  # run 1 had nothing new
    e0 = entries[0]
    assert e0.part is not None and (e0.part.seq, e0.part.out_lines, e0.part.err_lines) == (1, 1, 1)
    assert e0.done == b"\x03" and e0.usage == Usage(1, 0, 2, 0) and not e0.shard_done
    assert await setup.blobs.read_all(e0.part.key) == b'{"line":0}\n{"line":1}\n'  # in order
    # the store has both parts, positions in commit order, and the counters
    assert await setup.parts() == [(0, 1, 0, 1, 1), (2, 1, 2, 1, 0)]
    assert await setup.done() == [b"\x03", b"\x00", b"\x08"]
    assert await setup.counters() == (2, 1, Usage(2, 0, 4, 0))
    # Nothing new: no transaction at all.
    await cp.checkpoint(runs)
    assert len(setup.queue.calls) == 1


async def test_failure_before_commit_puts_results_back(setup: Setup) -> None:
    cp = Checkpointer(setup.queue, 10)
    [run] = await setup.runs(4, 4)
    result(run, 0)
    setup.blobs.fail = True
    with pytest.raises(BlobError):
        await cp.checkpoint([run])
    assert setup.queue.calls == [] and await setup.parts() == []
    setup.blobs.fail = False
    result(run, 1)
    await cp.checkpoint([run])
    [[entry]] = setup.queue.calls
    assert entry.part is not None and entry.part.seq == 1 and entry.part.out_lines == 2
    assert entry.usage == Usage(2, 0, 4, 0) and entry.done == b"\x03"
    assert await setup.parts() == [(0, 1, 0, 2, 0)]
    assert await setup.counters() == (2, 0, Usage(2, 0, 4, 0))


async def test_store_errors_are_retried_with_the_same_results(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("batchd.engine.checkpoints.STORE_RETRY_SECONDS", 0.01)
    setup.queue.fail = 2
    [run] = await setup.runs(4, 4)
    result(run, 0)
    await Checkpointer(setup.queue, 10).checkpoint([run])
    [[entry]] = setup.queue.calls
    assert entry.part is not None and entry.part.seq == 1
    assert await setup.parts() == [(0, 1, 0, 1, 0)]


async def test_a_lost_shard_is_stopped_and_the_others_commit(setup: Setup) -> None:
    cp = Checkpointer(setup.queue, 10)
    runs = await setup.runs(8, 4)
    await setup.take_over(runs, 1)
    for run in runs:
        result(run, 0)
    await cp.checkpoint(runs)
    assert not runs[0].lost and not runs[0].stop.is_set()
    assert runs[1].lost and runs[1].stop.is_set()
    assert await setup.parts() == [(0, 1, 0, 1, 0)]  # nothing of the lost shard
    assert await setup.done() == [b"\x01", b"\x00"]
    with pytest.raises(LeaseLost):
        result(runs[1], 1)
        await runs[1].checkpoint(final=True)


async def test_shard_done_in_a_round_needs_no_final_transaction(setup: Setup) -> None:
    run, other = await setup.runs(4, 2)
    run.checkpointer = Checkpointer(setup.queue, 10)
    result(run, 0)
    result(run, 1)
    await run.checkpointer.checkpoint([run])
    assert setup.queue.calls[0][0].shard_done and run.released
    await run.checkpoint(final=True)
    assert len(setup.queue.calls) == 1
    # A shard not done gets its final transaction even with nothing new: it releases the lease.
    await other.checkpoint(final=True)
    assert setup.queue.calls[1][0].release and setup.queue.calls[1][0].part is None
    # the done shard is not claimed again; the released one is, at once
    claims = await setup.store.queue.claim_shards("w2", 2, time.time(), LEASE)
    assert [(c.idx, c.done) for c in claims] == [(1, b"\x00")]


async def test_periodic_rounds_run_while_shards_are_registered(setup: Setup) -> None:
    cp = Checkpointer(setup.queue, 0.01)
    runs = await setup.runs(8, 4)
    for run in runs:
        cp.add(run)
        result(run, 0)
    for _ in range(100):
        if setup.queue.calls:
            break
        await asyncio.sleep(0.01)
    assert [len(c) for c in setup.queue.calls] == [2]
    assert await setup.parts() == [(0, 1, 0, 1, 0), (1, 1, 1, 1, 0)]
    for run in runs:
        cp.discard(run)
    await cp.close()


# -- limiter ---------------------------------------------------------------------------------
async def test_limiter_fast_path_and_fifo_waiters() -> None:
    lim = DeploymentLimiter(Deployment(model="m", base_url="http://x", max_concurrency=2))
    assert lim.try_acquire() and lim.try_acquire()
    assert not lim.try_acquire() and lim.in_flight == 2
    order: list[int] = []

    async def waiter(n: int) -> None:
        await lim.acquire(0)
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert lim.want == 2  # capped at max_concurrency
    lim.release()
    await asyncio.sleep(0)
    assert order == [0] and lim.in_flight == 2
    assert not lim.try_acquire()  # others queue: no overtaking
    lim.release()
    lim.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and lim.in_flight == 2
    lim.release()
    lim.release()
    assert lim.in_flight == 0


async def test_limiter_with_rates_takes_the_slow_path() -> None:
    lim = DeploymentLimiter(Deployment(model="m", base_url="http://x", rpm=600, tpm=10**6))
    assert not lim.try_acquire()
    async with lim.slot(100):
        assert lim.in_flight == 1
    assert lim.in_flight == 0


# -- headers ----------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        b"X-Request-ID: abc\r\nRetry-After: 3\r\nDate: now\r\nX-Other: 1\r\n",
        b"x-request-id: abc\r\nretry-after: 3\r\nserver: s\r\n",
        b"X-REQUEST-ID: abc\r\nRETRY-AFTER: 3\r\nContent-Type: text/plain\r\n",
        b"x-ReQuEsT-iD: abc\r\nrEtRy-AfTeR: 3\r\n",
    ],
)
async def test_headers_kept_whatever_their_spelling(raw: bytes) -> None:
    conn = _Conn(asyncio.get_running_loop())
    conn.transport = cast(Any, SimpleNamespace(is_closing=lambda: False, write=lambda _: None))
    waiter = conn.start(b"")
    conn.data_received(b"HTTP/1.1 200 OK\r\n" + raw + b"Content-Length: 2\r\n\r\nok")
    await waiter
    assert conn.headers == {
        b"x-request-id": b"abc",
        b"retry-after": b"3",
        b"content-length": b"2",
    }
    assert conn.body() == b"ok" and conn.keep_alive


# -- polling -----------------------------------------------------------------------------------
def test_idle_polls_slow_down_while_shards_run() -> None:
    engine = Engine.__new__(Engine)
    engine._cfg = SimpleNamespace(poll_seconds=0.25)  # type: ignore[assignment]
    engine._runs = {}
    assert engine._idle_wait() == 0.25
    engine._runs = {("b", 0): cast(ShardRun, object())}
    assert engine._idle_wait() == 0.25 * BUSY_POLL_FACTOR


async def test_checkpoint_outcomes_are_returned_and_acted_on_by_the_runs(setup: Setup) -> None:
    runs = await setup.runs(9, 4)  # shards of 4, 4 and 1 lines
    await setup.take_over(runs, 1)
    for run in runs:
        result(run, 0)
    outcomes = await Checkpointer(setup.queue, 10).checkpoint(runs)
    b = setup.batch_id
    assert outcomes == {
        (b, 0): Outcome.COMMITTED,
        (b, 1): Outcome.LEASE_LOST,
        (b, 2): Outcome.RELEASED,  # its one line is done: the lease ended
    }
    assert [(r.lost, r.released) for r in runs] == [(False, False), (True, False), (False, True)]
    # "w" still holds shard 0 only: shard 1 is the other worker's, shard 2 is done
    held = [(b, i, runs[i].claim.token) for i in range(3)]
    assert await setup.queue.renew_leases("w", held, time.time() + LEASE) == [(b, 1), (b, 2)]


def test_the_checkpointer_knows_shards_only_through_its_protocol() -> None:
    import ast

    import batchd.engine.checkpoints as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name and name.startswith("batchd.engine.shard") for name in imported)
