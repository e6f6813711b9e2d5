"""Checkpoints of the shards one process runs: one transaction per interval for all of them.

Every ``checkpoint_seconds`` the results each running shard gathered since its last
checkpoint are stored as a part blob of result records per shard, and the parts, the
done-bitmaps and the batches' counters of all those shards are committed in one transaction
(:meth:`batchd.store.protocols.QueueStore.checkpoint_many`). Each shard stays fenced by its
own lease token: a shard whose lease was lost stores nothing, the others commit. Each shard
is told its :class:`Outcome` (committed, released, lease lost) and acts on it: this module
knows shards only through :class:`Checkpointed`.

One lock orders every checkpoint of the process, periodic and final, so a shard's bitmaps
reach the store in the order they were taken. If anything fails before the commit, the
results are put back and go with the next checkpoint; the commit itself is never cancelled
half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from batchd.errors import StoreError
from batchd.models import Part, ShardClaim, Usage
from batchd.store.protocols import QueueStore, ShardCheckpoint

log = logging.getLogger(__name__)

STORE_RETRY_SECONDS = 0.5


class Outcome(enum.Enum):
    """What a checkpoint did for one shard (the shard's runner acts on it)."""

    COMMITTED = "committed"  # stored; the shard still holds its lease
    RELEASED = "released"  # stored, and the lease ended (the shard is done, or it stops)
    LEASE_LOST = "lease_lost"  # refused: another worker holds the shard; nothing stored


@dataclass(slots=True)
class Taken:
    """Results taken from a shard for one checkpoint (put back if it fails): result record
    lines (:mod:`batchd.results.record`), ``out`` of them succeeded and ``err`` not."""

    records: list[bytes]
    out: int
    err: int
    usage: Usage
    done: bytes
    seq: int  # the shard's part sequence before this checkpoint
    shard_done: bool
    part: Part | None = None


class Checkpointed(Protocol):
    """What the checkpointer needs of a running shard."""

    @property
    def key(self) -> tuple[str, int]: ...

    @property
    def claim(self) -> ShardClaim: ...

    @property
    def park_until(self) -> float: ...

    def take(self, *, final: bool) -> Taken | None:
        """The results gathered since the last checkpoint, or None when there is nothing."""

    def put_back(self, taken: Taken) -> None:
        """A checkpoint failed before its commit: its results go with the next one."""

    async def write_part(self, taken: Taken) -> Part | None:
        """Store the taken results as a part blob; the part to commit."""

    def settle(self, outcome: Outcome) -> None:
        """The checkpoint's outcome for this shard (called once it committed)."""


class Checkpointer:
    """Commits the checkpoints of every shard registered with it, one transaction a round.

    The periodic round runs on a task of its own while at least one shard is registered."""

    def __init__(self, store: QueueStore, interval: float) -> None:
        self._store = store
        self.interval = interval
        self._runs: dict[tuple[str, int], Checkpointed] = {}
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        self.rounds = 0  # transactions committed (for tests and benchmarks)

    def add(self, run: Checkpointed) -> None:
        self._runs[run.key] = run
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def discard(self, run: Checkpointed) -> None:
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

    async def checkpoint(
        self, runs: Iterable[Checkpointed], *, final: bool = False
    ) -> dict[tuple[str, int], Outcome]:
        """Store what ``runs`` gathered since their last checkpoint, in one transaction, and
        return each stored shard's :class:`Outcome` (a run with nothing to store has none),
        also given to its ``settle``. ``final``: the runs end, their leases are released."""
        async with self._lock:
            taken: list[tuple[Checkpointed, Taken]] = []
            for run in runs:
                t = run.take(final=final)
                if t is not None:
                    taken.append((run, t))
            if not taken:
                return {}
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
            return self._settle(taken, lost, final)

    @staticmethod
    def _settle(
        taken: list[tuple[Checkpointed, Taken]], lost: list[tuple[str, int]], final: bool
    ) -> dict[tuple[str, int], Outcome]:
        lost_keys = set(lost)
        outcomes: dict[tuple[str, int], Outcome] = {}
        for run, t in taken:
            if run.key in lost_keys:
                outcome = Outcome.LEASE_LOST
            elif t.shard_done or final:
                outcome = Outcome.RELEASED  # the store holds no lease of it any more
            else:
                outcome = Outcome.COMMITTED
            outcomes[run.key] = outcome
            run.settle(outcome)
        return outcomes
