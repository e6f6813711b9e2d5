"""The engine's per-request and per-interval machinery without a store or an upstream: the
process-wide checkpointer, the deployment limiter's fast path and the HTTP/1.1
client's header handling."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from batchd.backends.http1 import _Conn
from batchd.blobs.base import Blobs
from batchd.config import Deployment
from batchd.engine.checkpoints import Checkpointer, Outcome
from batchd.engine.limits import DeploymentLimiter
from batchd.engine.shard import ShardRun
from batchd.engine.worker import BUSY_POLL_FACTOR, Engine
from batchd.errors import BlobError, LeaseLost, StoreError
from batchd.models import ShardClaim, ShardSpan, Usage
from batchd.store.protocols import QueueStore, ShardCheckpoint


class FakeStore:
    def __init__(self) -> None:
        self.calls: list[list[ShardCheckpoint]] = []
        self.lost: list[tuple[str, int]] = []
        self.fail = 0  # store errors to raise before succeeding

    async def checkpoint_many(self, entries: Sequence[ShardCheckpoint]) -> list[tuple[str, int]]:
        if self.fail:
            self.fail -= 1
            raise StoreError("down")
        self.calls.append(list(entries))
        return [(e.claim.batch_id, e.claim.idx) for e in entries if (e.claim.batch_id,
                                                                      e.claim.idx) in self.lost]


class FakeBlobs:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.fail = False

    async def put(self, key: str, data: bytes) -> None:
        if self.fail:
            raise BlobError("no space")
        self.data[key] = data


def make_run(store: FakeStore, blobs: FakeBlobs, idx: int, count: int = 4) -> ShardRun:
    claim = ShardClaim("batch_1", idx, ShardSpan(0, 10, 1, count), 7, bytes(1), 0,
                       "/v1/chat/completions", "in", 10**10)
    run = ShardRun(claim=claim, store=cast(QueueStore, store), blobs=cast(Blobs, blobs),
                   spool=Path("/nonexistent"), routes={}, checkpoint_seconds=0.05,
                   cancel_grace=0.1)
    run._done = bytearray(1)
    return run


def result(run: ShardRun, i: int, ok: bool = True) -> None:
    run._record(i, ok, b'{"line":%d}\n' % i, Usage(1, 0, 2, 0) if ok else None)


async def test_one_transaction_for_all_shards_with_new_results() -> None:
    store, blobs = FakeStore(), FakeBlobs()
    cp = Checkpointer(cast(QueueStore, store), 10)
    runs = [make_run(store, blobs, i) for i in range(3)]
    result(runs[0], 0)
    result(runs[0], 1, ok=False)
    result(runs[2], 3)
    await cp.checkpoint(runs)
    assert len(store.calls) == 1 and cp.rounds == 1
    entries = store.calls[0]
    assert [e.claim.idx for e in entries] == [0, 2]  # run 1 had nothing new
    e0 = entries[0]
    assert e0.part is not None and (e0.part.seq, e0.part.out_lines, e0.part.err_lines) == (1, 1, 1)
    assert e0.done == b"\x03" and e0.usage == Usage(1, 0, 2, 0) and not e0.shard_done
    assert blobs.data[e0.part.key] == b'{"line":0}\n{"line":1}\n'  # one blob, in order
    # Nothing new: no transaction at all.
    await cp.checkpoint(runs)
    assert len(store.calls) == 1


async def test_failure_before_commit_puts_results_back() -> None:
    store, blobs = FakeStore(), FakeBlobs()
    cp = Checkpointer(cast(QueueStore, store), 10)
    run = make_run(store, blobs, 0)
    result(run, 0)
    blobs.fail = True
    with pytest.raises(BlobError):
        await cp.checkpoint([run])
    assert store.calls == []
    blobs.fail = False
    result(run, 1)
    await cp.checkpoint([run])
    [[entry]] = store.calls
    assert entry.part is not None and entry.part.seq == 1 and entry.part.out_lines == 2
    assert entry.usage == Usage(2, 0, 4, 0) and entry.done == b"\x03"


async def test_store_errors_are_retried_with_the_same_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("batchd.engine.checkpoints.STORE_RETRY_SECONDS", 0.01)
    store, blobs = FakeStore(), FakeBlobs()
    store.fail = 2
    run = make_run(store, blobs, 0)
    result(run, 0)
    await Checkpointer(cast(QueueStore, store), 10).checkpoint([run])
    [[entry]] = store.calls
    assert entry.part is not None and entry.part.seq == 1


async def test_a_lost_shard_is_stopped_and_the_others_commit() -> None:
    store, blobs = FakeStore(), FakeBlobs()
    store.lost = [("batch_1", 1)]
    cp = Checkpointer(cast(QueueStore, store), 10)
    runs = [make_run(store, blobs, i) for i in range(2)]
    for run in runs:
        result(run, 0)
    await cp.checkpoint(runs)
    assert not runs[0].lost and not runs[0].stop.is_set()
    assert runs[1].lost and runs[1].stop.is_set()
    with pytest.raises(LeaseLost):
        result(runs[1], 1)
        await runs[1].checkpoint(final=True)


async def test_shard_done_in_a_round_needs_no_final_transaction() -> None:
    store, blobs = FakeStore(), FakeBlobs()
    run = make_run(store, blobs, 0, count=2)
    run.checkpointer = Checkpointer(cast(QueueStore, store), 10)
    result(run, 0)
    result(run, 1)
    await run.checkpointer.checkpoint([run])
    assert store.calls[0][0].shard_done and run.released
    await run.checkpoint(final=True)
    assert len(store.calls) == 1
    # A shard not done gets its final transaction even with nothing new: it releases the lease.
    other = make_run(store, blobs, 1)
    await other.checkpoint(final=True)
    assert store.calls[1][0].release and store.calls[1][0].part is None


async def test_periodic_rounds_run_while_shards_are_registered() -> None:
    store, blobs = FakeStore(), FakeBlobs()
    cp = Checkpointer(cast(QueueStore, store), 0.01)
    runs = [make_run(store, blobs, i) for i in range(2)]
    for run in runs:
        cp.add(run)
        result(run, 0)
    for _ in range(100):
        if store.calls:
            break
        await asyncio.sleep(0.01)
    assert [len(c) for c in store.calls] == [2]
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


async def test_checkpoint_outcomes_are_returned_and_acted_on_by_the_runs() -> None:
    store, blobs = FakeStore(), FakeBlobs()
    store.lost = [("batch_1", 1)]
    runs = [make_run(store, blobs, i, count=n) for i, n in ((0, 4), (1, 4), (2, 1))]
    for run in runs:
        result(run, 0)
    outcomes = await Checkpointer(cast(QueueStore, store), 10).checkpoint(runs)
    assert outcomes == {
        ("batch_1", 0): Outcome.COMMITTED,
        ("batch_1", 1): Outcome.LEASE_LOST,
        ("batch_1", 2): Outcome.RELEASED,  # its one line is done: the lease ended
    }
    assert [(r.lost, r.released) for r in runs] == [(False, False), (True, False), (False, True)]


def test_the_checkpointer_knows_shards_only_through_its_protocol() -> None:
    import ast

    import batchd.engine.checkpoints as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name and name.startswith("batchd.engine.shard") for name in imported)
