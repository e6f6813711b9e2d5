"""Reading a batch's committed results in position order (the order they were committed).

Only committed results are ever read: a part is visible once its checkpoint's transaction
committed, with positions fixed then (:meth:`batchd.store.protocols.QueueStore.result_parts`),
so a reader sees every result exactly once across crashes and takeovers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import anyio.to_thread

from batchd.blobs.base import Blobs
from batchd.results.record import SUCCEEDED, Record, decode_records
from batchd.store.protocols import QueueStore

# Parts over this size are decoded on a worker thread (a part is at most a checkpoint's
# results of one shard: 1,000 records).
_THREAD_BYTES = 256 * 1024


async def read_results(
    store: QueueStore,
    blobs: Blobs,
    batch_id: str,
    after: int = -1,
    outcome: Literal["succeeded", "failed"] | None = None,
) -> AsyncIterator[tuple[int, Record]]:
    """``(pos, record)`` of every committed result of ``batch_id`` with ``pos > after``, in
    position order. ``store``: the queue the batch's parts are committed to (``store.queue``
    of a :class:`batchd.store.protocols.Store`). ``outcome``: ``"succeeded"`` only,
    ``"failed"`` every other outcome (failed, cancelled, expired), None all. Raises
    :class:`batchd.errors.BlobNotFound` when a part's blob is gone (the batch's results were
    deleted while reading)."""
    for part in await store.result_parts(batch_id, after):
        data = await blobs.read_all(part.key)
        if len(data) > _THREAD_BYTES:
            records = await anyio.to_thread.run_sync(decode_records, data)
        else:
            records = decode_records(data)
        for pos, rec in enumerate(records, part.first_pos):
            if pos <= after:
                continue
            if outcome is not None and (rec.outcome == SUCCEEDED) != (outcome == SUCCEEDED):
                continue
            yield pos, rec
