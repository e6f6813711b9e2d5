"""``QueueStore.checkpoint_many``: several shards' checkpoints in one transaction, each fenced
by its own lease token, in memory, on SQLite and PostgreSQL (the store contract's fixture)."""

from __future__ import annotations

from batchd.models import Part, Usage
from batchd.store.protocols import ShardCheckpoint, Store
from tests.integration.test_store_contract import T0, running_batch


async def test_one_transaction_for_several_shards_fenced_each(store: Store) -> None:
    a = await running_batch(store)
    a0_stale, a1, a2 = await store.queue.claim_shards("w1", 3, T0, 5)
    # a0's lease lapses and w2 takes it over; w1 keeps a1 and a2.
    [a0] = await store.queue.claim_shards("w2", 1, T0 + 6, 5)
    assert (a0.batch_id, a0.idx, a0_stale.idx) == (a.id, 0, 0)
    held = [(a.id, 1, a1.token), (a.id, 2, a2.token)]
    lost = await store.queue.renew_leases("w1", held, T0 + 100)
    assert lost == []
    b = await running_batch(store)
    b0, _b1, _b2 = await store.queue.claim_shards("w1", 3, T0 + 6, 5)
    assert b0.batch_id == b.id

    def part(c: object, seq: int, out: int, err: int) -> Part:
        assert isinstance(c, type(a1))
        return Part(c.batch_id, c.idx, seq, f"p{c.idx}.{seq}", out, err)

    lost = await store.queue.checkpoint_many(
        [
            ShardCheckpoint(a0_stale, b"\xff\x03", part(a0_stale, 1, 10, 0), Usage(9, 9, 9, 9),
                            shard_done=True),
            ShardCheckpoint(a1, b"\x03\x00", part(a1, 1, 1, 1), Usage(1, 0, 2, 0),
                            shard_done=False),
            ShardCheckpoint(a2, b"\x1f", part(a2, 1, 5, 0), Usage(3, 1, 4, 1), shard_done=True),
            ShardCheckpoint(b0, b"\x01\x00", None, Usage(), shard_done=False, release=True),
        ]
    )
    assert lost == [(a.id, 0)]
    got = await store.batches.get_batch(a.id)
    assert got is not None
    # a1 and a2 are counted; nothing of the refused a0.
    assert (got.completed, got.failed) == (6, 1)
    assert got.usage == Usage(4, 1, 6, 1)
    parts = await store.queue.result_parts(a.id)
    # positions in the order of the checkpoints in the transaction
    assert [(p.shard_idx, p.seq, p.first_pos) for p in parts] == [(1, 1, 0), (2, 1, 2)]
    shards = {idx: done for idx, _, done in await store.queue.batch_shards(a.id)}
    assert shards == {0: bytes(2), 1: b"\x03\x00", 2: b"\x1f"}
    # a2 is done and b0 released: b0 is the one shard claimable now.
    again = await store.queue.claim_shards("w3", 10, T0 + 7, 5)
    assert [(c.batch_id, c.idx) for c in again] == [(b.id, 0)]
    # The new holder of a0 checkpoints as usual.
    assert await store.queue.checkpoint_many(
        [ShardCheckpoint(a0, b"\xff\x03", part(a0, 1, 10, 0), Usage(), shard_done=True)]
    ) == []
    assert await store.queue.checkpoint_many([]) == []
