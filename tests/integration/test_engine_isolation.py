"""The engine's side loops isolate their batches, and a batch cancelled while it is still
validating reports every line once (every store: memory, SQLite and PostgreSQL; real blobs,
the real engine)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from batchd.blobs.local import LocalBlobs
from batchd.config import Settings
from batchd.engine import failures as failures_module
from batchd.engine.finalize import Finalizer
from batchd.engine.worker import Engine
from batchd.models import FAILED, IN_PROGRESS, VALIDATING, BatchRecord, new_id, now
from batchd.service.activation import Activator
from batchd.store.protocols import Store
from tests.store_support import DEPLOYMENT, lines, make_batch


@pytest.fixture
def parts(store: Store, tmp_path: Path) -> tuple[Settings, Store, LocalBlobs]:
    """The settings (a deployment of the lines' model), a store of each implementation
    (integration/conftest.py: memory, SQLite, PostgreSQL) and local blobs."""
    settings = Settings(data_dir=tmp_path, deployments=[DEPLOYMENT])
    return settings, store, LocalBlobs(tmp_path / "files")


async def test_cancel_while_validating_lists_every_line(parts: Any, tmp_path: Path) -> None:
    settings, store, blobs = parts
    batch = await make_batch(store, blobs, lines(5, "v"))
    cancelled = await store.batches.request_cancel(batch.id, "p", now())
    assert cancelled is not None and cancelled.status == "cancelling"
    # not finalised before its lines are known: that would end it with total 0
    assert await store.queue.claim_finalize("w", 1e12, 10, ("file-a", "file-b")) is None
    assert [b.id for b in await store.batches.validating_batches()] == [batch.id]
    await Activator(settings, store.files, store.batches).activate(cancelled)
    started = await store.batches.get_batch(batch.id)
    assert started is not None and (started.status, started.total) == ("cancelling", 5)
    assert await store.batches.validating_batches() == []
    leased = await store.queue.claim_finalize(
        "w", now() + 1.0, 10, (new_id("file-"), new_id("file-"))
    )
    assert leased is not None and leased.id == batch.id
    await Finalizer(store.queue, blobs, tmp_path / "spool", "w").finalize(leased)
    ended = await store.batches.get_batch(batch.id)
    assert ended is not None and ended.status == "cancelled"
    assert (ended.total, ended.completed, ended.failed) == (5, 0, 5)
    assert ended.error_file_id is not None
    err_file = await store.files.get_file(ended.error_file_id)
    assert err_file is not None
    rows = [json.loads(x) for x in (await blobs.read_all(err_file.blob_key)).splitlines()]
    assert sorted(r["custom_id"] for r in rows) == [f"v-{i}" for i in range(5)]
    assert {r["error"]["code"] for r in rows} == {"batch_cancelled"}


async def test_a_batch_that_fails_to_start_never_stops_the_others(
    parts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, store, blobs = parts
    monkeypatch.setattr(failures_module, "FIRST_BACKOFF", 0.0)
    bad = await make_batch(store, blobs, lines(2, "bad"))
    good = await make_batch(store, blobs, lines(2, "good"))
    engine = Engine(settings, store, blobs, {}, owner="w")
    real = engine._activator.activate

    async def activate(batch: BatchRecord) -> None:
        if batch.id == bad.id:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        await real(batch)

    monkeypatch.setattr(engine._activator, "activate", activate)
    await engine._start_waiting_batches()
    got = await store.batches.get_batch(good.id)
    assert got is not None and got.status == IN_PROGRESS  # at once, despite the other
    got = await store.batches.get_batch(bad.id)
    assert got is not None and got.status == VALIDATING
    for _ in range(failures_module.MAX_TRIES - 1):
        await engine._start_waiting_batches()
    failed = await store.batches.get_batch(bad.id)
    assert failed is not None and failed.status == FAILED and failed.errors
    assert failed.errors[0].code == "internal_error"
    assert "OverflowError" in failed.errors[0].message
    assert await store.batches.validating_batches() == []

    # the sweep's other steps run although one raises
    async def boom(*_: int) -> int:
        raise RuntimeError("expiry broke")

    collected: list[str] = []

    async def collect(*_: int) -> list[Any]:
        collected.append("ran")
        return []

    monkeypatch.setattr(store.files, "expire_files", boom)
    monkeypatch.setattr(store.files, "deleted_files_unreferenced", collect)
    await engine.sweep()
    assert collected == ["ran"]


async def test_a_dead_finaliser_is_taken_over_within_its_short_lease(parts: Any) -> None:
    """Finalising is leased for seconds and renewed by a heartbeat: a live finaliser keeps
    its batch, a dead one's batch is claimed by another engine once the lease lapses."""
    from batchd.engine.worker import FINALIZE_LEASE

    settings, store, blobs = parts
    assert FINALIZE_LEASE <= 10
    batch = await make_batch(store, blobs, lines(2, "f"))
    await store.batches.request_cancel(batch.id, "p", now())
    await Activator(settings, store.files, store.batches).activate(batch)
    t = float(now()) + 1
    ids = (new_id("file-"), new_id("file-"))
    assert await store.queue.claim_finalize("a", t, FINALIZE_LEASE, ids) is not None
    assert (
        await store.queue.claim_finalize("b", t + FINALIZE_LEASE / 2, FINALIZE_LEASE, ids) is None
    )
    assert await store.queue.renew_finalize(batch.id, "a", t + 2 * FINALIZE_LEASE)
    assert (
        await store.queue.claim_finalize("b", t + 1.5 * FINALIZE_LEASE, FINALIZE_LEASE, ids) is None
    )
    taken = await store.queue.claim_finalize("b", t + 2 * FINALIZE_LEASE + 0.1, FINALIZE_LEASE, ids)
    assert taken is not None and taken.id == batch.id
    assert not await store.queue.renew_finalize(batch.id, "a", t + 100)  # "a" lost it


async def test_a_shard_that_keeps_failing_backs_off_then_fails_its_batch(
    parts: Any, tmp_path: Path
) -> None:
    """A shard whose run raises (its input bytes are gone) is released with a backoff, not
    claimed again at once in a loop; after MAX_TRIES its batch ends failed, naming why."""
    from batchd.engine.shard import ShardRun

    settings, store, blobs = parts
    batch = await make_batch(store, blobs, lines(2, "s"))
    await Activator(settings, store.files, store.batches).activate(batch)
    await blobs.delete(batch.input_blob_key)
    engine = Engine(settings, store, blobs, {}, owner="w")
    for attempt in range(failures_module.MAX_TRIES):
        # past any backoff (at most 60 s), and past the lease of the run before
        claims = await store.queue.claim_shards("w", 1, time.time() + 61 * (attempt > 0), 30)
        assert len(claims) == 1, attempt
        run = ShardRun(claims[0], store.queue, blobs, tmp_path / "spool", engine._routes, 0.1, 0.1)
        await engine._run_shard(run)
        if attempt < failures_module.MAX_TRIES - 1:
            assert await store.queue.claim_shards("w", 1, time.time() + 1, 30) == []  # backing off
    ended = await store.batches.get_batch(batch.id)
    assert ended is not None and ended.status == FAILED and ended.errors
    assert ended.errors[0].code == "internal_error"
    assert "could not be run after 5 tries" in ended.errors[0].message
