"""A counted number of places, handed out first come, first served (an asyncio semaphore
without its per-call overhead: taking a free place is a comparison and an increment, and a
queue forms only when every place is taken). Used for requests in flight, per upstream
connection pool and per deployment."""

from __future__ import annotations

import asyncio
import collections
import contextlib


class FifoSlots:
    __slots__ = ("_waiters", "capacity", "in_flight")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_take(self) -> bool:
        """A place now if one is free and nobody queues for one."""
        if self.in_flight < self.capacity and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def take(self) -> None:
        """A place, waiting in line for it when none is free. Pair with :meth:`give_back`."""
        if self.try_take():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give_back()  # granted, then cancelled before use
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def give_back(self) -> None:
        self.in_flight -= 1
        if self._waiters:
            self.wake()

    def wake(self) -> None:
        """Hand free places to the first in line (after a ``capacity`` change too)."""
        while self._waiters and self.in_flight < self.capacity:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)
