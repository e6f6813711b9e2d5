"""Result positions (``parts.first_pos``): assigned in the checkpoint's transaction from the
batch row's counter, so they are unique, contiguous and in commit order, in memory, on SQLite
and on PostgreSQL (the store contract's fixtures), with two servers checkpointing shards of one
batch at once."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from batchd.backends.base import UpstreamResponse
from batchd.blobs.keys import part_key
from batchd.blobs.local import LocalBlobs
from batchd.models import UNEXECUTED_SHARD, Part, ShardClaim, Usage
from batchd.results.answer import answer_record
from batchd.results.reader import read_results
from batchd.store.protocols import ShardCheckpoint, Store
from tests.integration.test_store_contract import T0, file_rec, finish_all_shards, running_batch


async def test_concurrent_checkpoints_get_contiguous_positions_in_commit_order(
    replicas: tuple[Store, Store],
) -> None:
    a, b = replicas
    rec = await running_batch(a)
    [ca] = await a.queue.claim_shards("w1", 1, T0, 600)
    [cb] = await b.queue.claim_shards("w2", 1, T0, 600)
    assert ca.idx != cb.idx
    clock = itertools.count()
    spans: dict[tuple[int, int], tuple[int, int]] = {}  # (shard, seq) -> (started, returned)

    async def run(server: Store, claim: ShardClaim) -> None:
        for seq in range(1, 16):
            lines = 1 + (seq + claim.idx) % 3
            part = Part(rec.id, claim.idx, seq, f"p{claim.idx}.{seq}", lines - 1, 1)
            started = next(clock)
            lost = await server.queue.checkpoint_many(
                [ShardCheckpoint(claim, bytes(2), part, Usage(1, 0, 1, 0), shard_done=False)]
            )
            assert lost == []
            spans[claim.idx, seq] = (started, next(clock))

    await asyncio.gather(run(a, ca), run(b, cb))
    parts = await a.queue.result_parts(rec.id)
    assert len(parts) == 30
    # unique and contiguous from 0
    pos = 0
    for p in parts:
        assert p.first_pos == pos
        pos += p.lines
    got = await b.batches.get_batch(rec.id)
    assert got is not None and got.completed + got.failed == pos and got.failed == 30
    # commit order: a checkpoint that returned before another started has earlier positions
    first = {(p.shard_idx, p.seq): p.first_pos for p in parts}
    for x, (_, x_end) in spans.items():
        for y, (y_start, _) in spans.items():
            if x_end < y_start:
                assert first[x] < first[y], (x, y)
    assert await a.queue.result_parts(rec.id, pos - 1) == []


async def test_result_parts_after_a_position(store: Store) -> None:
    rec = await running_batch(store)
    [c] = await store.queue.claim_shards("w", 1, T0, 600)
    for seq, lines in ((1, 3), (2, 1), (3, 2)):  # positions 0-2, 3, 4-5
        part = Part(rec.id, c.idx, seq, f"k{seq}", lines, 0)
        await store.queue.checkpoint(c, done=bytes(2), part=part, usage=Usage(), shard_done=False)
    seqs = [
        [p.seq for p in await store.queue.result_parts(rec.id, after)] for after in range(-1, 6)
    ]
    assert seqs == [[1, 2, 3], [1, 2, 3], [1, 2, 3], [2, 3], [3], [3], []]


async def test_last_part_is_committed_once_after_every_executed_result(
    store: Store,
) -> None:
    rec = await running_batch(store)
    [c] = await store.queue.claim_shards("w", 1, T0, 5)
    part = Part(rec.id, c.idx, 1, "k1", 2, 1)
    await store.queue.checkpoint(c, done=bytes(2), part=part, usage=Usage(), shard_done=False)
    await store.batches.request_cancel(rec.id, "p", at=3)
    claimed = await store.queue.claim_finalize("f", T0 + 10, 60, ("file-o", "file-e"))
    assert claimed is not None and claimed.id == rec.id
    last = Part(rec.id, UNEXECUTED_SHARD, 0, "unexec", 0, 22)
    assert not await store.queue.commit_last_part(last, "someone-else")  # fenced by the lease
    assert await store.queue.commit_last_part(last, "f")
    assert await store.queue.commit_last_part(last, "f")  # a retry adds nothing
    parts = await store.queue.result_parts(rec.id)
    assert [(p.shard_idx, p.first_pos, p.lines) for p in parts] == [
        (c.idx, 0, 3),
        (UNEXECUTED_SHARD, 3, 22),
    ]
    got = await store.batches.get_batch(rec.id)
    assert got is not None and (got.completed, got.failed) == (2, 23)


async def test_parts_outlive_finalising_until_the_result_files_are_gone(
    store: Store,
) -> None:
    rec = await running_batch(store)
    await finish_all_shards(store, rec)
    claimed = await store.queue.claim_finalize("f", T0, 60, ("file-o", "file-e"))
    assert claimed is not None
    assert await store.queue.batches_with_results_gone() == []  # not ended yet
    out = file_rec(fid="file-o")
    assert await store.queue.complete_batch(
        rec.id, "f", status="completed", at=10, output_file=out, error_file=None,
        completed=25, failed=0,
    )
    assert await store.queue.batches_with_results_gone() == []  # its output file is there
    assert await store.files.mark_file_deleted("file-o", "p", at=11) is not None
    assert await store.queue.batches_with_results_gone() == [rec.id]
    await store.files.purge_file("file-o")  # its bytes went too: no record at all
    assert await store.queue.batches_with_results_gone() == [rec.id]
    assert len(await store.queue.result_parts(rec.id)) == 3
    await store.queue.delete_result_parts(rec.id)
    assert await store.queue.result_parts(rec.id) == []
    assert await store.queue.batches_with_results_gone() == []


async def test_read_results_in_position_order_after_a_cursor(
    store: Store, tmp_path: Path
) -> None:
    blobs = LocalBlobs(tmp_path / "blobs")
    rec = await running_batch(store)
    c0, c1 = await store.queue.claim_shards("w", 2, T0, 600)
    ok = answer_record(b'"ok"', UpstreamResponse(200, b'{"n":1}', "r"), 1.0)[1]
    bad = answer_record(b'"bad"', UpstreamResponse(500, b"{}", "r"), 1.0)[1]
    # shard 1 commits first: its results come first
    for claim, seq, records in ((c1, 1, [ok, bad]), (c0, 1, [bad]), (c1, 2, [ok, ok, bad])):
        key = part_key(rec.id, claim.idx, claim.token, seq)
        await blobs.put(key, b"".join(records))
        n_ok = sum(r is ok for r in records)
        part = Part(rec.id, claim.idx, seq, key, n_ok, len(records) - n_ok)
        await store.queue.checkpoint(
            claim, done=bytes(2), part=part, usage=Usage(), shard_done=False
        )

    async def read(after: int = -1, outcome: Any = None) -> list[tuple[int, str | None]]:
        return [
            (pos, r.outcome)
            async for pos, r in read_results(store.queue, blobs, rec.id, after, outcome)
        ]

    assert await read() == [
        (0, "succeeded"), (1, "failed"), (2, "failed"), (3, "succeeded"), (4, "succeeded"),
        (5, "failed"),
    ]
    assert await read(after=3) == [(4, "succeeded"), (5, "failed")]
    assert await read(outcome="succeeded") == [(0, "succeeded"), (3, "succeeded"), (4, "succeeded")]
    assert await read(after=1, outcome="failed") == [(2, "failed"), (5, "failed")]
    assert await read(after=5) == []
