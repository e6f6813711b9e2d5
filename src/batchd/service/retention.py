"""Retention: the reaper that enforces ``expires_after`` (files) and ``output_expires_after``
(a batch's result files), as OpenAI documents them, and collects deleted files.

One process at a time reaps, across every replica on the store: it holds the ``retention``
lease (:class:`batchd.store.protocols.LeaseStore`), renewed at each pass, taken over by another
process once it lapses (its holder died). Each step is idempotent, so a holder that crashes
mid-way leaves nothing the next pass cannot finish:

1. files past ``expires_at`` are marked deleted (one ``UPDATE``);
2. every deleted file that no unfinished batch reads loses its bytes, then its row
   (:meth:`batchd.service.files.FileService.collect_if_unused`: a blob already gone is no
   error, so a crash between the two only repeats the first);
3. the results of a batch whose result files are all gone (expired or deleted: the
   output and error files, rendered from them, were the last to need them; for a message
   batch too, whose results are kept as long as its files) lose their part blobs, then
   their part rows (a crash between the two repeats the first: a blob already gone is no
   error);
4. idempotency keys past their 24 h are forgotten.

A file that a running batch still reads (its input) keeps its bytes until the batch ends:
step 2 skips it, and the pass after the batch's end collects it.
"""

from __future__ import annotations

import logging
import time

from batchd.models import now
from batchd.service.files import FileService
from batchd.store.protocols import Store

log = logging.getLogger(__name__)

LEASE_NAME = "retention"


class Reaper:
    def __init__(
        self,
        store: Store,
        files: FileService,
        *,
        owner: str,
        lease_seconds: float,
        batch: int = 100,
    ) -> None:
        """``lease_seconds``: how long a pass holds the lease (longer than the time between
        passes, or the holder would lose it between them); ``batch``: files per step."""
        self._store = store
        self._files = files
        self._leases = store.leases
        self._keys = store.keys
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._batch = batch

    async def reap(self) -> bool:
        """One pass, if this process holds (or takes) the lease; whether it did."""
        if not await self._leases.acquire(
            LEASE_NAME, self._owner, time.time(), self._lease_seconds
        ):
            return False
        at = now()
        for step in (
            self._expire(at),
            self._collect(),
            self._drop_results(),
            self._keys.forget_lapsed(at),
        ):
            try:  # each step on its own: one that fails never stops the others
                await step
            except Exception:
                log.exception("retention step failed; it runs again at the next pass")
        return True

    async def _expire(self, at: int) -> None:
        expired = await self._store.files.expire_files(at, self._batch)
        if expired:
            log.info("retention: %d files expired", expired)

    async def _collect(self) -> None:
        for rec in await self._store.files.deleted_files_unreferenced(self._batch):
            try:
                await self._files.collect_if_unused(rec)
            except Exception:
                log.exception("file %s: removing its bytes failed; tried again later", rec.id)

    async def _drop_results(self) -> None:
        queue = self._store.queue
        for batch_id in await queue.batches_with_results_gone(self._batch):
            parts = await queue.result_parts(batch_id)
            await self._files.blobs.delete_many(p.key for p in parts)
            await queue.delete_result_parts(batch_id)
            log.info("batch %s: its results are deleted with its result files", batch_id)

    async def release(self) -> None:
        """Give the lease up (a clean stop), so that another process takes over at once."""
        await self._leases.release(LEASE_NAME, self._owner)
