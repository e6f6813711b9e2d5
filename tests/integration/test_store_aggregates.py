"""The rest of the store contract, whole, on every implementation (the ``store`` fixture:
memory, SQLite, PostgreSQL): the webhook outbox, token usage, message batches, the queue
state, the slot leases' live engines, and the batch ends outside finalising."""

from __future__ import annotations

import pytest

from batchd.errors import StoreError
from batchd.models import (
    CANCELLING,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
    Part,
    Usage,
    ValidationIssue,
)
from batchd.store.protocols import Store
from batchd.store.types import MessageBatchRow, QueueState, SlotDemand, SlotUse, TokenUsage
from tests.integration.test_store_contract import (
    SPANS,
    T0,
    batch_rec,
    finish_all_shards,
    running_batch,
)

ISSUE = ValidationIssue("internal_error", "kept failing", None)


async def batch_in(store: Store, project: str, model: str | None, estimate: int) -> BatchRecord:
    """A batch of ``project`` activated on ``model`` with ``estimate`` tokens (validating,
    with the fixture's 7, when ``model`` is None)."""
    rec = batch_rec(project)
    await store.batches.insert_batch(rec)
    if model is not None:
        assert await store.batches.activate_batch(
            rec.id, model=model, spans=SPANS[:1], token_estimate=estimate, at=2
        )
    return rec


# -- the webhook outbox --------------------------------------------------------------------------
async def test_outbox_claims_leases_delivers_and_retries_events(store: Store) -> None:
    ended = [batch_rec("p"), batch_rec("q"), batch_rec("p")]
    for i, rec in enumerate(ended):
        await store.batches.insert_batch(rec)
        assert await store.batches.fail_batch(rec.id, [ISSUE], at=10 + i)
    assert await store.outbox.claim_events(T0, 30, limit=0) == []

    first = await store.outbox.claim_events(T0, 30, limit=2)
    assert [(e.project, e.batch_id, e.type, e.created_at, e.attempts) for e in first] == [
        ("p", ended[0].id, "batch.failed", 10, 0),
        ("q", ended[1].id, "batch.failed", 11, 0),
    ]
    assert first[0].id < first[1].id  # by id
    rest = await store.outbox.claim_events(T0 + 1, 30)  # the first two are leased
    assert [(e.batch_id, e.created_at) for e in rest] == [(ended[2].id, 12)]
    assert await store.outbox.claim_events(T0 + 2, 30) == []
    e0, e1, e2 = first[0].id, first[1].id, rest[0].id

    await store.outbox.event_done(e0, at=20)  # delivered: never claimed again
    await store.outbox.event_retry(e1, 1, T0 + 100)  # failed once, next attempt at T0 + 100
    await store.outbox.event_retry(e2, 5, None)  # given up
    assert await store.outbox.claim_events(T0 + 99, 30) == []
    again = await store.outbox.claim_events(T0 + 100, 30)
    assert [(e.id, e.attempts) for e in again] == [(e1, 1)]
    assert await store.outbox.claim_events(T0 + 129, 30) == []  # e1 leased till T0 + 130
    assert [e.id for e in await store.outbox.claim_events(T0 + 131, 30)] == [e1]
    await store.outbox.event_done(e1, at=21)
    assert await store.outbox.claim_events(T0 + 10**7, 30) == []
    await store.outbox.event_done("evt_missing", at=22)  # unknown ids change nothing
    await store.outbox.event_retry("evt_missing", 1, T0)
    assert await store.outbox.claim_events(T0 + 10**7, 30) == []


# -- token usage ---------------------------------------------------------------------------------
async def test_token_usage_sums_per_project_and_model(store: Store) -> None:
    assert await store.usage.token_usage() == []  # an empty store (PostgreSQL's GROUP BY)
    live = await batch_in(store, "p", "m1", 100)
    ended = await batch_in(store, "p", "m1", 50)
    cancelling = await batch_in(store, "p", "m2", 30)
    await batch_in(store, "p", None, 0)  # validating, no model yet: estimate 7
    no_model = batch_rec("p")
    await store.batches.insert_batch(no_model)
    assert await store.batches.fail_batch(no_model.id, [ISSUE], at=3)  # ended, never a model
    other = await batch_in(store, "q", "m1", 20)
    used = {live.id: Usage(10, 4, 5, 1), ended.id: Usage(3, 0, 2, 0), other.id: Usage(1, 0, 1, 0)}
    for c in await store.queue.claim_shards("w", 10, T0, 30):
        if c.batch_id in used:
            part = Part(c.batch_id, c.idx, 1, f"parts/{c.batch_id}", 1, 0)
            await store.queue.checkpoint(
                c, done=b"\x01\x00", part=part, usage=used[c.batch_id], shard_done=False
            )
    assert await store.batches.fail_started_batch(ended.id, ISSUE, at=4)  # frees its 50
    assert await store.batches.request_cancel(cancelling.id, "p", at=5) is not None

    p_rows = [
        TokenUsage("p", "", 7, 0, 0, 1),
        TokenUsage("p", "m1", 100, 13, 7, 1),
        TokenUsage("p", "m2", 30, 0, 0, 1),  # cancelling holds its tokens until it ends
    ]
    q_rows = [TokenUsage("q", "m1", 20, 1, 1, 1)]
    assert await store.usage.token_usage() == p_rows + q_rows
    assert await store.usage.token_usage("p") == p_rows
    assert await store.usage.token_usage("q") == q_rows
    assert await store.usage.token_usage("nobody") == []
    assert p_rows[1].to_wire() == {
        "object": "usage",
        "project": "p",
        "model": "m1",
        "enqueued_tokens": 100,
        "input_tokens": 13,
        "output_tokens": 7,
        "unfinished_batches": 1,
    }


# -- message batches -----------------------------------------------------------------------------
async def test_message_batches_insert_get_list_counts_and_delete(store: Store) -> None:
    recs = [batch_rec("p") for _ in range(4)]
    for r in [*recs, batch_rec("q")]:
        await store.batches.insert_batch(r)
    q_batch = (await store.batches.list_batches("q", limit=1, after=None))[0]
    rows = [MessageBatchRow(f"msgbatch_0{i}", "p", r.id, 100 + i) for i, r in enumerate(recs)]
    for row in rows:
        await store.message_batches.insert(row)
    await store.message_batches.insert(MessageBatchRow("msgbatch_09", "q", q_batch.id, 200))
    mb = store.message_batches

    got = await mb.get("p", "msgbatch_01")
    assert got is not None and got[0] == rows[1]
    assert got[1] == await store.batches.get_batch(recs[1].id)
    assert await mb.get("q", "msgbatch_01") is None  # another project's
    assert await mb.get("p", "msgbatch_09") is None
    assert await mb.get("p", "msgbatch_missing") is None

    async def page(**kw: str | int | None) -> tuple[list[str], bool]:
        args: dict[str, str | int | None] = {"limit": 2, "after": None, "before": None, **kw}
        found, more = await mb.list("p", **args)  # type: ignore[arg-type]
        assert all(b.id == m.batch_id for m, b in found)
        return [m.id for m, _ in found], more

    assert await page() == (["msgbatch_03", "msgbatch_02"], True)  # newest first
    assert await page(after="msgbatch_02") == (["msgbatch_01", "msgbatch_00"], False)
    assert await page(after="msgbatch_03", limit=1) == (["msgbatch_02"], True)
    assert await page(before="msgbatch_00") == (["msgbatch_02", "msgbatch_01"], True)
    assert await page(before="msgbatch_01", limit=5) == (["msgbatch_03", "msgbatch_02"], False)
    assert await page(limit=10) == ([f"msgbatch_0{i}" for i in (3, 2, 1, 0)], False)

    counts = {"succeeded": 3, "errored": 1, "canceled": 0, "expired": 2}
    await mb.keep_counts("msgbatch_02", counts)
    kept = await mb.get("p", "msgbatch_02")
    assert kept is not None and kept[0].counts == counts

    assert not await mb.mark_deleted("q", "msgbatch_02", at=9)  # not its project's
    assert await mb.mark_deleted("p", "msgbatch_02", at=9)
    assert not await mb.mark_deleted("p", "msgbatch_02", at=10)
    assert not await mb.mark_deleted("p", "msgbatch_missing", at=10)
    assert await mb.get("p", "msgbatch_02") is None
    assert await page(limit=10) == ([f"msgbatch_0{i}" for i in (3, 1, 0)], False)
    assert await mb.get("q", "msgbatch_09") is not None


async def test_a_batch_has_one_message_batch(store: Store) -> None:
    """``batch_id`` is unique (SQL's UNIQUE), ids are unique, and the batch must exist."""
    rec = batch_rec("p")
    await store.batches.insert_batch(rec)
    await store.message_batches.insert(MessageBatchRow("msgbatch_a", "p", rec.id, 1))
    with pytest.raises(StoreError):
        await store.message_batches.insert(MessageBatchRow("msgbatch_b", "p", rec.id, 2))
    other = batch_rec("p")
    await store.batches.insert_batch(other)
    with pytest.raises(StoreError):
        await store.message_batches.insert(MessageBatchRow("msgbatch_a", "p", other.id, 3))
    with pytest.raises(StoreError):
        await store.message_batches.insert(MessageBatchRow("msgbatch_c", "p", "batch_none", 4))
    # nothing of the refused inserts was kept: the other batch can still get one
    await store.message_batches.insert(MessageBatchRow("msgbatch_d", "p", other.id, 5))
    found, more = await store.message_batches.list("p", limit=10, after=None, before=None)
    assert ([m.id for m, _ in found], more) == (["msgbatch_d", "msgbatch_a"], False)
    assert [m.batch_id for m, _ in found] == [other.id, rec.id]


# -- the queue state and the slot leases ---------------------------------------------------------
async def lease_three_engines(store: Store) -> None:
    """a and b hold leases until T0 + 30 (a: "m" for projects p and q; b: "m" for p and "n"
    for no project), c until T0 + 0.5 only."""
    a = await store.slots.lease_slots(
        "a", {"m": SlotDemand(10, 6, 0, {"p": 4, "q": 2})}, T0, T0 + 30
    )
    assert a["m"].slots == 6
    b = await store.slots.lease_slots(
        "b", {"m": SlotDemand(10, 3, 0, {"p": 3}), "n": SlotDemand(5, 2, 0)}, T0, T0 + 30
    )
    assert (b["m"].slots, b["n"].slots) == (3, 2)
    await store.slots.lease_slots("c", {"m": SlotDemand(10, 20, 0)}, T0, T0 + 0.5)


async def test_queue_state_counts_batches_shards_requests_and_slots(store: Store) -> None:
    assert await store.queue.queue_state(T0) == QueueState()
    await store.batches.insert_batch(batch_rec())  # validating
    first = await running_batch(store)  # 25 requests in 3 shards
    [c0, c1] = await store.queue.claim_shards("w", 2, T0, 5)  # first's shards 0 and 1
    await store.queue.checkpoint(
        c0, done=b"\xff\x03", part=Part(first.id, 0, 1, "p0", 8, 2), usage=Usage(), shard_done=True
    )
    await running_batch(store)  # 3 shards waiting, 25 requests
    cancelling = await running_batch(store)
    await store.batches.request_cancel(cancelling.id, "p", at=3)  # its shards wait for nobody
    failed = batch_rec()
    await store.batches.insert_batch(failed)
    await store.batches.fail_batch(failed.id, [ISSUE], at=3)
    await lease_three_engines(store)

    slots = {"m": SlotUse(2, 9, 9), "n": SlotUse(1, 2, 2)}  # c's lease lapsed at T0 + 0.5
    wants = {"m": {"p": 7, "q": 2}, "n": {"": 2}}
    statuses = {VALIDATING: 1, IN_PROGRESS: 2, CANCELLING: 1, FAILED: 1}
    assert await store.queue.queue_state(T0 + 1) == QueueState(
        statuses, shards_waiting=4, shards_leased=1, requests_left=65, slots=slots,
        project_wants=wants,
    )
    assert c1.idx == 1  # leased until T0 + 5: waiting again after
    later = await store.queue.queue_state(T0 + 6)
    assert (later.shards_waiting, later.shards_leased) == (5, 0)
    assert await store.queue.queue_state(T0 + 31) == QueueState(
        statuses, shards_waiting=5, shards_leased=0, requests_left=65
    )


async def test_live_engines_are_the_owners_of_unexpired_slot_leases(store: Store) -> None:
    assert await store.slots.live_engines(T0) == 0
    await lease_three_engines(store)
    assert await store.slots.live_engines(T0) == 3  # b holds two deployments: one engine
    assert await store.slots.live_engines(T0 + 1) == 2
    await store.slots.release_slots("a")
    assert await store.slots.live_engines(T0 + 1) == 1
    assert await store.slots.live_engines(T0 + 31) == 0


# -- batch ends outside finalising ---------------------------------------------------------------
async def test_fail_started_batch_ends_any_unfinished_batch(store: Store) -> None:
    running = await running_batch(store)
    await store.queue.claim_shards("w", 1, T0, 5)
    assert await store.batches.enqueued_tokens("m") == 9
    assert await store.batches.fail_started_batch(running.id, ISSUE, at=7)
    b = await store.batches.get_batch(running.id)
    assert b is not None and (b.status, b.failed_at, b.errors) == (FAILED, 7, [ISSUE])
    assert await store.batches.enqueued_tokens("m") == 0
    assert await store.queue.claim_shards("w", 10, T0 + 100, 5) == []  # no longer claimed
    assert await store.queue.claim_finalize("f", T0 + 100, 60, ("file-o", "file-e")) is None
    assert not await store.batches.fail_started_batch(running.id, ISSUE, at=8)  # ended already
    assert not await store.batches.fail_started_batch("batch_missing", ISSUE, at=8)

    # one claimed for finalising loses its lease and its result file ids
    finalising = await running_batch(store)
    await finish_all_shards(store, finalising)
    leased = await store.queue.claim_finalize("f", T0 + 100, 60, ("file-o", "file-e"))
    assert leased is not None and leased.id == finalising.id
    assert await store.batches.fail_started_batch(finalising.id, ISSUE, at=9)
    b = await store.batches.get_batch(finalising.id)
    assert b is not None and (b.status, b.output_file_id, b.error_file_id) == (FAILED, None, None)
    assert not await store.queue.renew_finalize(finalising.id, "f", T0 + 200)

    validating = batch_rec()
    await store.batches.insert_batch(validating)
    assert await store.batches.fail_started_batch(validating.id, ISSUE, at=10)
    events = await store.outbox.claim_events(T0, 30)
    assert [(e.batch_id, e.type, e.created_at) for e in events] == [
        (running.id, "batch.failed", 7),
        (finalising.id, "batch.failed", 9),
        (validating.id, "batch.failed", 10),
    ]

    done = await running_batch(store)
    await finish_all_shards(store, done)
    assert await store.queue.claim_finalize("g", T0 + 200, 60, ("file-1", "file-2")) is not None
    assert await store.queue.complete_batch(
        done.id, "g", status=COMPLETED, at=11, output_file=None, error_file=None,
        completed=25, failed=0,
    )
    assert not await store.batches.fail_started_batch(done.id, ISSUE, at=12)
    ended = await store.batches.get_batch(done.id)
    assert ended is not None and ended.status == COMPLETED


async def test_delete_unstarted_batch_removes_only_a_validating_batch(store: Store) -> None:
    validating = batch_rec()
    await store.batches.insert_batch(validating)
    await store.message_batches.insert(MessageBatchRow("msgbatch_v", "p", validating.id, 1))
    started = await running_batch(store)
    cancelled = batch_rec()
    await store.batches.insert_batch(cancelled)
    await store.batches.request_cancel(cancelled.id, "p", at=2)

    await store.batches.delete_unstarted_batch(validating.id)
    await store.batches.delete_unstarted_batch(started.id)
    await store.batches.delete_unstarted_batch(cancelled.id)
    await store.batches.delete_unstarted_batch("batch_missing")
    assert await store.batches.get_batch(validating.id) is None
    assert await store.message_batches.get("p", "msgbatch_v") is None  # went with it
    assert [b.id for b in await store.batches.validating_batches()] == [cancelled.id]
    kept = await store.batches.get_batch(started.id)
    assert kept is not None and kept.status == IN_PROGRESS
    assert len(await store.queue.batch_shards(started.id)) == len(SPANS)
    # the batch's id is free again, and it can have a message batch anew
    await store.batches.insert_batch(validating)
    await store.message_batches.insert(MessageBatchRow("msgbatch_w", "p", validating.id, 3))
