"""Reading a batch's committed results in position order (the order they were committed).

Only committed results are ever read: a part is visible once its checkpoint's transaction
committed, with positions fixed then (:meth:`batchd.store.protocols.QueueStore.result_parts`),
so a reader sees every result exactly once across crashes and takeovers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Literal, TypeVar

import anyio.to_thread

from batchd.blobs.base import Blobs
from batchd.results.record import SUCCEEDED, Record, decode_records
from batchd.store.protocols import QueueStore

# Parts over this size are decoded (or rendered) on a worker thread; smaller ones on the
# event loop, where they take well under a millisecond and a thread's hand-off would cost
# more (a part is at most a checkpoint's results of one shard: 1,000 records).
_THREAD_BYTES = 256 * 1024

T = TypeVar("T")


async def by_size(data: bytes, work: Callable[[bytes], T]) -> T:
    """``work(data)``: on a worker thread when ``data`` is over :data:`_THREAD_BYTES`, else
    at once."""
    if len(data) > _THREAD_BYTES:
        return await anyio.to_thread.run_sync(work, data)
    return work(data)


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
        records = await by_size(await blobs.read_all(part.key), decode_records)
        for pos, rec in enumerate(records, part.first_pos):
            if pos <= after:
                continue
            if outcome is not None and (rec.outcome == SUCCEEDED) != (outcome == SUCCEEDED):
                continue
            yield pos, rec
