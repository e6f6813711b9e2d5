"""Checkpoints of the shards one process runs: one transaction per interval for all of them.

Every ``checkpoint_seconds`` the results each running shard gathered since its last
checkpoint are stored as a part blob per shard, and the parts, the done-bitmaps and the
batches' counters of all those shards are committed in one transaction
(:meth:`batchd.store.protocols.QueueStore.checkpoint_many`). Each shard stays fenced by its
own lease token: a shard whose lease was lost stores nothing and is stopped, the others commit.

One lock orders every checkpoint of the process, periodic and final, so a shard's bitmaps
reach the store in the order they were taken. If anything fails before the commit, the
results are put back and go with the next checkpoint; the commit itself is never cancelled
half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchd.errors import StoreError
from batchd.models import Part, Usage
from batchd.store.protocols import QueueStore, ShardCheckpoint
from batchd.telemetry.logs import about

if TYPE_CHECKING:
    from batchd.engine.shard import ShardRun

log = logging.getLogger(__name__)

STORE_RETRY_SECONDS = 0.5


@dataclass(slots=True)
class Taken:
    """Results taken from a shard for one checkpoint (put back if it fails)."""

    out: list[bytes]
    err: list[bytes]
    usage: Usage
    done: bytes
    seq: int  # the shard's part sequence before this checkpoint
    shard_done: bool
    part: Part | None = None


class Checkpointer:
    """Commits the checkpoints of every shard registered with it, one transaction a round.

    The periodic round runs on a task of its own while at least one shard is registered."""

    def __init__(self, store: QueueStore, interval: float) -> None:
        self._store = store
        self.interval = interval
        self._runs: dict[tuple[str, int], ShardRun] = {}
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        self.rounds = 0  # transactions committed (for tests and benchmarks)

    def add(self, run: ShardRun) -> None:
        self._runs[run.key] = run
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def discard(self, run: ShardRun) -> None:
        if self._runs.get(run.key) is run:
            del self._runs[run.key]

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    async def _tick(self) -> None:
        while self._runs:
            await asyncio.sleep(self.interval)
            try:
                await self.checkpoint(list(self._runs.values()))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checkpoint failed; its results go with the next one")

    async def checkpoint(self, runs: Iterable[ShardRun], *, final: bool = False) -> None:
        """Store what ``runs`` gathered since their last checkpoint, in one transaction.
        ``final``: the runs end, their leases are released. A run whose lease was lost is
        marked ``lost`` and stopped (nothing of it is stored)."""
        async with self._lock:
            taken: list[tuple[ShardRun, Taken]] = []
            for run in runs:
                t = run.take(final=final)
                if t is not None:
                    taken.append((run, t))
            if not taken:
                return
            committed = False
            try:
                for run, t in taken:
                    t.part = await run.write_part(t)
                entries = [
                    ShardCheckpoint(
                        run.claim,
                        t.done,
                        t.part,
                        t.usage,
                        t.shard_done,
                        final,
                        run.park_until if final and run.park_until else None,
                    )
                    for run, t in taken
                ]
                while True:
                    commit = asyncio.ensure_future(self._store.checkpoint_many(entries))
                    try:
                        lost = await asyncio.shield(commit)
                        committed = True
                        break
                    except asyncio.CancelledError:
                        # Let the transaction end, so that what we believe matches the store.
                        with contextlib.suppress(Exception):
                            await commit
                        if commit.done() and not commit.cancelled() and not commit.exception():
                            committed = True  # stored: nothing to put back
                            self._settle(taken, commit.result(), final)
                        raise
                    except StoreError:
                        log.warning(
                            "checkpoint of %d shards failed; retrying", len(entries), exc_info=True
                        )
                        await asyncio.sleep(STORE_RETRY_SECONDS)
            finally:
                if not committed:
                    for run, t in taken:
                        run.put_back(t)
            self.rounds += 1
            self._settle(taken, lost, final)

    @staticmethod
    def _settle(
        taken: list[tuple[ShardRun, Taken]], lost: list[tuple[str, int]], final: bool
    ) -> None:
        lost_keys = set(lost)
        for run, t in taken:
            if run.key in lost_keys:
                if not run.lost:
                    log.warning(
                        "shard %s/%d: lease lost; its checkpoint was refused",
                        *run.key,
                        extra=about(run.claim),
                    )
                run.lost = True
                run.request_stop("batch_cancelled")
            elif t.shard_done or final:
                run.released = True  # the store holds no lease of it any more
