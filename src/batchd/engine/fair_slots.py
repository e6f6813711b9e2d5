"""A deployment's in-flight places, shared fairly between the projects and batches that wait.

Each request names its flow, ``(project, batch)``. A free place goes to the waiting project
that uses the fewest places for its weight (``in use / weight``), and within it to the
waiting batch that uses the fewest; requests of one batch are served first come, first
served. It is work-conserving: a flow alone, or the only one waiting, takes every free
place. So a 20-line batch that arrives while a 20,000-line one fills the deployment gets
its share as soon as places free up: within one request's time, not one shard's.

Taking a free place when nobody waits is a comparison and three increments, as with
:class:`batchd.fifo_slots.FifoSlots`; choosing among waiters costs one pass over the
projects that wait (and that project's batches), a handful in practice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

Waiters = collections.deque[asyncio.Future[None]]


class FairSlots:
    __slots__ = (
        "_batch_used",
        "_project_used",
        "_waiting",
        "_weight",
        "capacity",
        "in_flight",
        "waiting",
    )

    def __init__(self, capacity: int, weight: Callable[[str], float] = lambda _: 1.0) -> None:
        """``weight(project)``: the project's share relative to the others (> 0)."""
        self.capacity = capacity
        self.in_flight = 0
        self.waiting = 0
        self._weight = weight
        self._project_used: collections.Counter[str] = collections.Counter()
        self._batch_used: collections.Counter[str] = collections.Counter()
        # project -> batch -> requests waiting, oldest first
        self._waiting: dict[str, dict[str, Waiters]] = {}

    def wants(self) -> dict[str, int]:
        """Places each project could use now: in use plus waiting."""
        wants = dict(self._project_used)
        for project, batches in self._waiting.items():
            wants[project] = wants.get(project, 0) + sum(len(q) for q in batches.values())
        return wants

    def used_by(self, project: str) -> int:
        """Places ``project`` holds now."""
        return self._project_used[project]

    def try_take(self, project: str, batch: str) -> bool:
        """A place now if one is free and nobody waits for one."""
        if self.in_flight < self.capacity and not self.waiting:
            self.in_flight += 1
            self._project_used[project] += 1
            self._batch_used[batch] += 1
            return True
        return False

    async def take(self, project: str, batch: str) -> None:
        """A place for ``(project, batch)``, waiting for its turn. Pair with
        :meth:`give_back` with the same flow."""
        if self.try_take(project, batch):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(project, {}).setdefault(batch, collections.deque())
        queue.append(fut)
        self.waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give_back(project, batch)  # granted, then cancelled before use
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(fut)
                    self.waiting -= 1
                self._prune(project, batch)
            raise

    def give_back(self, project: str, batch: str) -> None:
        self.in_flight -= 1
        self._project_used[project] -= 1
        self._batch_used[batch] -= 1
        if not self._project_used[project]:
            del self._project_used[project]
        if not self._batch_used[batch]:
            del self._batch_used[batch]
        if self.waiting:
            self.wake()

    def wake(self) -> None:
        """Hand free places to the waiters whose turn it is (after a ``capacity`` change too)."""
        while self.waiting and self.in_flight < self.capacity:
            project = min(
                self._waiting, key=lambda p: self._project_used[p] / max(self._weight(p), 1e-9)
            )
            batches = self._waiting[project]
            batch = min(batches, key=self._batch_used.__getitem__)
            fut = batches[batch].popleft()
            self.waiting -= 1
            self._prune(project, batch)
            if fut.done():
                continue
            self.in_flight += 1
            self._project_used[project] += 1
            self._batch_used[batch] += 1
            fut.set_result(None)

    def _prune(self, project: str, batch: str) -> None:
        batches = self._waiting.get(project)
        if batches is None:
            return
        if batch in batches and not batches[batch]:
            del batches[batch]
        if not batches:
            del self._waiting[project]
