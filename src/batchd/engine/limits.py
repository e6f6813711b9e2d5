"""Per-deployment limits on what is sent upstream: requests in flight, per minute, tokens
per minute. One :class:`DeploymentLimiter` per deployment per process.

The limits hold for the whole cluster: each process leases a share of a deployment's slots
(:mod:`batchd.engine.slots`) and :meth:`DeploymentLimiter.resize` sets its capacity to that
share; its requests-per-minute and tokens-per-minute are the same share of the deployment's.
Built without a lease, a limiter has the deployment's whole ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from aiolimiter import AsyncLimiter

from batchd.config import Deployment


class DeploymentLimiter:
    def __init__(self, deployment: Deployment, *, capacity: int | None = None) -> None:
        self.model = deployment.model
        self.max_concurrency = deployment.max_concurrency
        self._rpm_max = deployment.rpm
        self._tpm_max = deployment.tpm
        self.capacity = 0
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._rpm: AsyncLimiter | None = None
        self._tpm: AsyncLimiter | None = None
        self._tpm_local = 0
        self.resize(deployment.max_concurrency if capacity is None else capacity)

    @property
    def want(self) -> int:
        """Slots this process could use now: in flight plus waiting, up to the limit."""
        return min(self.max_concurrency, self.in_flight + len(self._waiters))

    def resize(self, capacity: int) -> None:
        """Set how many requests may be in flight from this process (its leased share).
        Requests already in flight above a smaller capacity finish; no new one starts."""
        capacity = max(0, min(capacity, self.max_concurrency))
        if capacity != self.capacity:
            self.capacity = capacity
            share = capacity / self.max_concurrency
            rpm = max(1, int(self._rpm_max * share)) if self._rpm_max else 0
            tpm = max(1, int(self._tpm_max * share)) if self._tpm_max else 0
            self._rpm = AsyncLimiter(rpm, 60) if rpm else None
            self._tpm = AsyncLimiter(tpm, 60) if tpm else None
            self._tpm_local = tpm
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.capacity:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)

    def try_acquire(self) -> bool:
        """Take a slot without waiting: only when one is free, nobody queues for one and no
        per-minute limit applies (the engine's path for nearly every request). Pair with
        :meth:`release`."""
        if (
            self.in_flight < self.capacity
            and not self._waiters
            and self._rpm is None
            and self._tpm is None
        ):
            self.in_flight += 1
            return True
        return False

    async def acquire(self, tokens: int) -> None:
        """Wait for a slot (first come, first served), then for the per-minute limits.
        Pair with :meth:`release`."""
        await self._acquire()
        try:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None and tokens > 0:
                await self._tpm.acquire(min(tokens, self._tpm_local))
        except BaseException:
            self.release()
            raise

    async def _acquire(self) -> None:
        if self.in_flight < self.capacity and not self._waiters:
            self.in_flight += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, then cancelled before use
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        if self._waiters:
            self._wake()

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        """Hold one in-flight slot for the length of one attempt."""
        if not self.try_acquire():
            await self.acquire(tokens)
        try:
            yield
        finally:
            self.release()
