"""One store contract, run in memory, on SQLite (a temporary file) and on PostgreSQL (a
fresh database per test), so that none can drift from the others (the ``store`` fixture of
tests/integration/conftest.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from batchd.errors import LeaseLost, StoreError
from batchd.models import (
    CANCELLING,
    FILE_PROCESSED,
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
    FileRecord,
    FileSummary,
    Part,
    ShardSpan,
    Usage,
    ValidationIssue,
    new_id,
)
from batchd.store.connect import HEAD_REVISION, _alembic_config, async_url, migrate
from batchd.store.protocols import Store
from batchd.store.schema import metadata
from batchd.store.types import SlotDemand

FAR = 10**10  # a deadline that never comes
T0 = 1_000.0  # lease clock of the tests


def file_rec(
    project: str = "p",
    summary: FileSummary | None = None,
    *,
    fid: str | None = None,
    status: str = FILE_PROCESSED,
) -> FileRecord:
    fid = fid or new_id("file-")
    return FileRecord(
        id=fid,
        project=project,
        filename="in.jsonl",
        purpose="batch",
        bytes=10,
        created_at=1,
        status=status,
        blob_key=f"inputs/{fid}",
        summary=summary or FileSummary(lines=3, issues=[ValidationIssue("c", "m", 2)]),
    )


def batch_rec(
    project: str = "p", *, expires_at: int = FAR, blob_key: str = "inputs/x"
) -> BatchRecord:
    return BatchRecord(
        id=new_id("batch_"),
        project=project,
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status=VALIDATING,
        created_at=1,
        expires_at=expires_at,
        input_blob_key=blob_key,
        metadata={"k": "v"},
        token_estimate=7,
    )


SPANS = [ShardSpan(0, 100, 1, 10), ShardSpan(100, 200, 11, 10), ShardSpan(200, 250, 21, 5)]


async def running_batch(store: Store, **kw: int) -> BatchRecord:
    rec = batch_rec(**kw)  # type: ignore[arg-type]
    await store.batches.insert_batch(rec)
    assert await store.batches.activate_batch(
        rec.id, model="m", spans=SPANS, token_estimate=9, at=2
    )
    return rec


# -- files ---------------------------------------------------------------------------------------
async def test_files_crud_and_pagination(store: Store) -> None:
    recs = [file_rec() for _ in range(5)]
    for r in recs:
        await store.files.insert_file(r)
    await store.files.insert_file(file_rec("other"))
    got = await store.files.get_file(recs[0].id, "p")
    assert got == recs[0]
    assert await store.files.get_file(recs[0].id, "other") is None
    assert await store.files.count_files("p") == 5

    ids = sorted(r.id for r in recs)  # ids made in one millisecond need not ascend
    page = await store.files.list_files("p", purpose=None, limit=2, after=None, order="desc")
    assert [f.id for f in page] == ids[::-1][:3]  # limit + 1
    page = await store.files.list_files("p", purpose=None, limit=2, after=ids[3], order="desc")
    assert [f.id for f in page] == ids[:3][::-1]
    page = await store.files.list_files("p", purpose=None, limit=10, after=ids[1], order="asc")
    assert [f.id for f in page] == ids[2:]
    outputs = await store.files.list_files(
        "p", purpose="batch_output", limit=9, after=None, order="asc"
    )
    assert outputs == []

    deleted = await store.files.mark_file_deleted(ids[0], "p", at=5)
    assert deleted is not None and deleted.id == ids[0]
    assert await store.files.mark_file_deleted(ids[0], "p", at=6) is None
    assert await store.files.get_file(ids[0]) is None
    assert await store.files.count_files("p") == 4
    assert [f.id for f in await store.files.deleted_files_unreferenced()] == [ids[0]]
    await store.files.purge_file(ids[0])
    assert await store.files.deleted_files_unreferenced() == []


async def test_file_summary_roundtrip(store: Store) -> None:
    summary = FileSummary(
        lines=3,
        issues=[ValidationIssue("duplicate_custom_id", "Line 3: dup", 3, "custom_id")],
        urls={"/v1/chat/completions": [3, 1, 2, 3]},
        models={"m": [3, 1, 2, 3]},
        shards=[ShardSpan(0, 10, 1, 2), ShardSpan(10, 15, 3, 1)],
        token_estimate=42,
    )
    rec = file_rec(status=FILE_PROCESSED)
    rec.summary = summary
    await store.files.insert_file(rec)
    got = await store.files.get_file(rec.id)
    assert got is not None and got.status == FILE_PROCESSED and got.summary == summary
    listed = await store.files.list_files(
        rec.project, purpose=None, limit=10, after=None, order="asc"
    )
    assert [f.id for f in listed] == [rec.id] and listed[0].summary is None  # lists skip it


# -- batches -------------------------------------------------------------------------------------
async def test_batches_crud_pagination_and_activation(store: Store) -> None:
    recs = [batch_rec() for _ in range(4)]
    for r in recs:
        await store.batches.insert_batch(r)
    assert await store.batches.get_batch(recs[0].id, "p") == recs[0]
    assert await store.batches.get_batch(recs[0].id, "nobody") is None
    ids = sorted(r.id for r in recs)  # ids made in one millisecond need not ascend
    assert [b.id for b in await store.batches.list_batches("p", limit=2, after=None)] == ids[::-1][
        :3
    ]
    assert [b.id for b in await store.batches.list_batches("p", limit=9, after=ids[2])] == ids[
        1::-1
    ]
    assert {b.id for b in await store.batches.validating_batches()} == set(ids)
    assert await store.batches.enqueued_tokens("m") == 0

    assert await store.batches.activate_batch(
        ids[0], model="m", spans=SPANS, token_estimate=9, at=3
    )
    assert not await store.batches.activate_batch(
        ids[0], model="m", spans=SPANS, token_estimate=9, at=3
    )
    b = await store.batches.get_batch(ids[0])
    assert b is not None
    assert (b.status, b.total, b.model, b.in_progress_at, b.token_estimate) == (
        IN_PROGRESS,
        25,
        "m",
        3,
        9,
    )
    assert [(i, s) for i, s, _ in await store.queue.batch_shards(ids[0])] == list(enumerate(SPANS))
    assert await store.batches.enqueued_tokens("m") == 9

    issues = [ValidationIssue("bad", "no", 1, "body")]
    assert await store.batches.fail_batch(ids[1], issues, at=4, model="m")
    assert not await store.batches.fail_batch(ids[1], issues, at=4)
    failed = await store.batches.get_batch(ids[1])
    assert failed is not None and failed.status == "failed" and failed.errors == issues

    cancelled = await store.batches.request_cancel(ids[2], "p", at=5)
    assert cancelled is not None and cancelled.status == CANCELLING
    assert await store.batches.request_cancel(ids[2], "other", at=5) is None


async def test_blob_in_use(store: Store) -> None:
    rec = await running_batch(store, blob_key="inputs/used")  # type: ignore[arg-type]
    assert await store.files.blob_in_use("inputs/used")
    assert not await store.files.blob_in_use("inputs/other")
    await store.batches.request_cancel(rec.id, "p", at=3)
    assert await store.files.blob_in_use("inputs/used")  # cancelling is not finished yet


# -- the work queue ------------------------------------------------------------------------------
async def test_claim_with_leases_and_takeover(store: Store) -> None:
    rec = await running_batch(store)
    first = await store.queue.claim_shards("a", 2, T0, 5)
    assert [(c.idx, c.token, c.span) for c in first] == [(0, 1, SPANS[0]), (1, 1, SPANS[1])]
    assert all(c.endpoint == rec.endpoint and c.expires_at == FAR for c in first)
    assert first[0].input_blob_key == rec.input_blob_key and first[0].done == bytes(2)
    rest = await store.queue.claim_shards("b", 5, T0 + 1, 5)
    assert [c.idx for c in rest] == [2]
    assert await store.queue.claim_shards("c", 5, T0 + 2, 5) == []  # all leased

    # a renews shard 0; shard 1's lease lapses and c takes it over with a new token.
    held = [(c.batch_id, c.idx, c.token) for c in first]
    assert await store.queue.renew_leases("a", held[:1], T0 + 20) == []
    taken = await store.queue.claim_shards("c", 5, T0 + 7, 5)
    assert [(c.idx, c.token) for c in taken] == [(1, 2), (2, 2)]
    assert await store.queue.renew_leases("a", held, T0 + 30) == [(rec.id, 1)]

    # Fencing: a's stale token changes nothing.
    part = Part(rec.id, 1, 1, "parts/o", 3, 0)
    with pytest.raises(LeaseLost):
        await store.queue.checkpoint(
            first[1], done=b"\xff\x03", part=part, usage=Usage(1, 0, 1, 0), shard_done=True
        )
    b = await store.batches.get_batch(rec.id)
    assert b is not None and (b.completed, b.failed, b.usage.input_tokens) == (0, 0, 0)
    assert await store.queue.result_parts(rec.id) == []
    shards = {i: done for i, _, done in await store.queue.batch_shards(rec.id)}
    assert shards[1] == bytes(2)


async def test_claims_skip_ended_and_expired_batches(store: Store) -> None:
    expired = await running_batch(store, expires_at=int(T0) + 1)  # type: ignore[arg-type]
    cancelled = await running_batch(store)
    await store.batches.request_cancel(cancelled.id, "p", at=2)
    validating = batch_rec()
    await store.batches.insert_batch(validating)
    assert await store.queue.claim_shards("a", 10, T0 + 2, 5) == []
    live = await running_batch(store)
    assert {c.batch_id for c in await store.queue.claim_shards("a", 10, T0 + 2, 5)} == {live.id}
    assert expired.id != live.id


async def test_claims_are_fair_between_batches(store: Store) -> None:
    """Each batch's first shard (counting what it holds) before any batch's second: a batch
    created later is claimed next, not after every shard of an older one."""
    old = await running_batch(store)
    first = await store.queue.claim_shards("a", 1, T0, 5)
    assert [(c.batch_id, c.idx, c.project) for c in first] == [(old.id, 0, "p")]
    new = await running_batch(store)
    newer = await running_batch(store)
    got = await store.queue.claim_shards("a", 2, T0, 5)
    # old holds one already: the two newer batches' first shards come before its second
    assert {(c.batch_id, c.idx) for c in got} == {(new.id, 0), (newer.id, 0)}
    got = await store.queue.claim_shards("a", 2, T0, 5)
    assert {(c.batch_id, c.idx) for c in got} == {(old.id, 1), (new.id, 1)}
    # with every batch running, an idle-only claim finds nothing; a new batch's it finds
    assert await store.queue.claim_shards("a", 1, T0, 5, idle_batches_only=True) == []
    idle = await running_batch(store)
    extra = await store.queue.claim_shards("a", 1, T0, 5, idle_batches_only=True)
    assert [(c.batch_id, c.idx) for c in extra] == [(idle.id, 0)]


async def test_parked_shards_and_paused_models_are_not_claimed(store: Store) -> None:
    rec = await running_batch(store)
    claims = await store.queue.claim_shards("a", 1, T0, 5)
    assert await store.queue.release_shard(claims[0], T0 + 100)
    assert [c.idx for c in await store.queue.claim_shards("b", 5, T0 + 1, 5)] == [1, 2]
    assert await store.queue.claim_shards("b", 5, T0 + 2, 5) == []  # 1, 2 leased till T0 + 6
    again = await store.queue.claim_shards("c", 1, T0 + 100, 5, paused_models=["other"])
    assert [(c.batch_id, c.idx, c.token) for c in again] == [(rec.id, 0, 2)]
    other = await running_batch(store)
    assert await store.queue.claim_shards("d", 5, T0 + 200, 5, paused_models=["m"]) == []
    assert other.model is None  # "m" is set on activation: both batches are paused


async def test_concurrent_claims_never_share_a_shard(store: Store) -> None:
    for _ in range(4):
        await running_batch(store)
    results = await asyncio.gather(*(store.queue.claim_shards(f"w{i}", 2, T0, 5) for i in range(8)))
    keys = [(c.batch_id, c.idx) for claims in results for c in claims]
    assert len(keys) == 12 and len(set(keys)) == 12


async def test_checkpoint_counters_and_signals(store: Store) -> None:
    rec = await running_batch(store)
    [c0, c1, c2] = await store.queue.claim_shards("a", 3, T0, 5)
    await store.queue.checkpoint(
        c0,
        done=b"\x0f\x00",
        part=Part(rec.id, 0, 1, "p1", 3, 1),
        usage=Usage(10, 2, 5, 1),
        shard_done=False,
    )
    await store.queue.checkpoint(
        c0,
        done=b"\xff\x03",
        part=Part(rec.id, 0, 2, "p2", 6, 0),
        usage=Usage(20, 0, 10, 0),
        shard_done=True,
    )
    await store.queue.checkpoint(
        c1, done=b"\x01\x00", part=None, usage=Usage(), shard_done=False, release=True
    )
    b = await store.batches.get_batch(rec.id)
    assert b is not None
    assert (b.completed, b.failed) == (9, 1)
    assert b.usage == Usage(30, 2, 15, 1)
    parts = await store.queue.result_parts(rec.id)
    assert [(p.seq, p.first_pos) for p in parts] == [(1, 0), (2, 4)]
    # Shard 0 is done: a checkpoint on it is refused; shard 1 was released: claimable at once.
    with pytest.raises(LeaseLost):
        await store.queue.checkpoint(
            c0, done=b"\xff\x03", part=None, usage=Usage(), shard_done=True
        )
    again = await store.queue.claim_shards("b", 5, T0 + 1, 5)
    assert [(c.idx, c.done, c.part_seq) for c in again] == [(1, b"\x01\x00", 0)]
    assert c2.idx == 2

    sig = await store.batches.signals([rec.id, rec.id, "batch_missing"])
    assert list(sig) == [rec.id] and sig[rec.id].status == IN_PROGRESS
    assert sig[rec.id].expires_at == FAR
    await store.batches.request_cancel(rec.id, "p", at=3)
    assert (await store.batches.signals([rec.id]))[rec.id].status == CANCELLING
    assert await store.batches.signals([]) == {}


# -- finalising ------------------------------------------------------------------------------------
async def finish_all_shards(store: Store, rec: BatchRecord) -> None:
    for c in await store.queue.claim_shards("a", 10, T0, 5):
        part = Part(rec.id, c.idx, 1, f"p{c.idx}", c.span.count, 0)
        await store.queue.checkpoint(c, done=b"\xff\xff", part=part, usage=Usage(), shard_done=True)


async def test_claim_finalize_and_complete_idempotent(store: Store) -> None:
    rec = await running_batch(store)
    assert (
        await store.queue.claim_finalize("f", T0, 60, ("file-o", "file-e")) is None
    )  # shards pending
    await finish_all_shards(store, rec)
    got = await store.queue.claim_finalize("f", T0, 60, ("file-o", "file-e"))
    assert got is not None and got.id == rec.id
    assert (got.output_file_id, got.error_file_id) == ("file-o", "file-e")
    assert await store.queue.claim_finalize("g", T0 + 1, 60, ("file-x", "file-y")) is None  # leased
    # The lease lapses: another finaliser takes over and keeps the ids chosen first.
    again = await store.queue.claim_finalize("g", T0 + 61, 60, ("file-x", "file-y"))
    assert again is not None and (again.output_file_id, again.error_file_id) == ("file-o", "file-e")
    await store.queue.mark_finalizing(rec.id, "g", at=9)
    out = file_rec(fid="file-o")
    assert not await store.queue.complete_batch(
        rec.id,
        "f",
        status="completed",
        at=10,
        output_file=out,
        error_file=None,
        completed=25,
        failed=0,
    )
    assert await store.queue.complete_batch(
        rec.id,
        "g",
        status="completed",
        at=10,
        output_file=out,
        error_file=None,
        completed=25,
        failed=0,
    )
    assert not await store.queue.complete_batch(
        rec.id,
        "g",
        status="completed",
        at=11,
        output_file=out,
        error_file=None,
        completed=25,
        failed=0,
    )
    done = await store.batches.get_batch(rec.id)
    assert done is not None
    assert (done.status, done.completed_at, done.finalizing_at, done.output_file_id) == (
        "completed",
        10,
        9,
        "file-o",
    )
    assert done.error_file_id is None and await store.files.get_file("file-o") is not None
    # the parts stay (the batch's results), positions contiguous in commit order
    parts = await store.queue.result_parts(rec.id)
    assert [p.first_pos for p in parts] == [0, parts[0].lines, parts[0].lines + parts[1].lines]
    assert await store.queue.claim_finalize("h", T0 + 200, 60, ("file-1", "file-2")) is None


async def test_cancelled_batch_finalises_once_leases_end(store: Store) -> None:
    rec = await running_batch(store)
    await store.queue.claim_shards("a", 1, T0, 5)
    await store.batches.request_cancel(rec.id, "p", at=3)
    assert await store.queue.claim_finalize("f", T0 + 1, 60, ("file-o", "file-e")) is None
    got = await store.queue.claim_finalize("f", T0 + 6, 60, ("file-o", "file-e"))
    assert got is not None and got.status == CANCELLING


# -- cluster-wide deployment limits --------------------------------------------------------------
async def test_slot_leases_share_a_limit_and_never_exceed_it(store: Store) -> None:
    def want(n: int, in_flight: int = 0) -> dict[str, SlotDemand]:
        return {"m": SlotDemand(limit=10, want=n, in_flight=in_flight)}

    a = await store.slots.lease_slots("a", want(10), T0, T0 + 3)
    assert (a["m"].slots, a["m"].capacity) == (10, 10)
    # b arrives: a holds everything, so b gets nothing yet but knows its fair share.
    b = await store.slots.lease_slots("b", want(10), T0, T0 + 3)
    assert (b["m"].slots, b["m"].target) == (0, 5)
    # a still has 10 in flight: it keeps them, may start no more than its share...
    a = await store.slots.lease_slots("a", want(10, in_flight=10), T0 + 1, T0 + 4)
    assert (a["m"].slots, a["m"].capacity) == (10, 5)
    assert (await store.slots.lease_slots("b", want(10), T0 + 1, T0 + 4))["m"].slots == 0
    # ...and hands back what drained.
    a = await store.slots.lease_slots("a", want(10, in_flight=5), T0 + 2, T0 + 5)
    assert (a["m"].slots, a["m"].settled) == (5, True)
    b = await store.slots.lease_slots("b", want(10), T0 + 2, T0 + 5)
    assert (b["m"].slots, b["m"].settled) == (5, True)
    # A small want leaves the rest to the others; other deployments are independent.
    c = await store.slots.lease_slots("c", {**want(2), "n": SlotDemand(4, 4, 0)}, T0 + 2, T0 + 20)
    assert (c["m"].slots, c["m"].target, c["n"].slots) == (0, 2, 4)
    # a's lease lapses (a crashed): its slots go to the others.
    b = await store.slots.lease_slots("b", want(10, in_flight=5), T0 + 6, T0 + 9)
    assert b["m"].slots == 8  # fair share next to c's 2
    await store.slots.release_slots("c")
    assert (await store.slots.lease_slots("b", want(10, 8), T0 + 7, T0 + 10))["m"].slots == 10


async def test_slot_leases_are_fair_between_projects(store: Store) -> None:
    """Shares go to projects first, then to the processes running each: a project's share
    does not grow with the number of processes that run its work."""

    def demand(**projects: int) -> dict[str, SlotDemand]:
        return {"m": SlotDemand(12, sum(projects.values()), 0, projects)}

    # a and b both run project "big"; c runs "small": small gets half, big's half is split
    await store.slots.lease_slots("a", demand(big=12), T0, T0 + 30)
    await store.slots.lease_slots("b", demand(big=12), T0, T0 + 30)
    c = await store.slots.lease_slots("c", demand(small=12), T0, T0 + 30)
    assert c["m"].target == 6
    a = await store.slots.lease_slots("a", demand(big=12), T0, T0 + 30)
    assert a["m"].target == 3
    # weights: small counts twice
    c = await store.slots.lease_slots(
        "c", demand(small=12), T0, T0 + 30, lambda p: 2.0 if p == "small" else 1.0
    )
    assert c["m"].target == 8
    # a project that wants little leaves the rest to the others (work-conserving)
    c = await store.slots.lease_slots("c", demand(small=2), T0, T0 + 30)
    assert c["m"].target == 2
    assert (await store.slots.lease_slots("b", demand(big=12), T0, T0 + 30))["m"].target == 5


# -- migrations ----------------------------------------------------------------------------------
# The schema and its migrations are the SQL stores' alone: these run on SQLite and PostgreSQL,
# not in memory (a store in memory has no schema to migrate).
def _diff(conn: Connection) -> list[object]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, metadata))


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    url: str = request.getfixturevalue("empty_pg_database")
    return url


async def test_migrations_create_exactly_the_schema(unmigrated_url: str) -> None:
    await asyncio.gather(migrate(unmigrated_url), migrate(unmigrated_url))  # replicas racing
    engine = create_async_engine(async_url(unmigrated_url))
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


def test_head_revision_is_alembics_head() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config("sqlite:///unused.db"))
    assert script.get_heads() == [HEAD_REVISION]


def test_migrate_never_loads_alembic_in_the_calling_process(tmp_path: Path) -> None:
    """The upgrade runs in a child; a schema at the head costs one query, no Alembic."""
    code = (
        "import asyncio, sys\n"
        "from batchd.store.connect import migrate, schema_revision\n"
        f"url = 'sqlite:///{tmp_path / 'x.db'}'\n"
        "assert asyncio.run(schema_revision(url)) is None\n"
        "asyncio.run(migrate(url))\n"
        "asyncio.run(migrate(url))\n"
        "print(asyncio.run(schema_revision(url)), 'alembic' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == [HEAD_REVISION, "False"]


async def test_a_failed_migration_says_why() -> None:
    with pytest.raises(StoreError, match=r"the schema migration failed: .*no_such_database"):
        await migrate("postgresql://postgres@127.0.0.1:5432/no_such_database")
