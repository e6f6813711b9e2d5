"""Per-deployment limits on what is sent upstream: requests in flight, per minute, tokens
per minute. One :class:`DeploymentLimiter` per deployment per process.

The limits hold for the whole cluster: each process leases a share of a deployment's slots
(:mod:`batchd.engine.slots`) and :meth:`DeploymentLimiter.resize` sets its capacity to that
share; its requests-per-minute and tokens-per-minute are the same share of the deployment's.
Built without a lease, a limiter has the deployment's whole ``max_concurrency``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiolimiter import AsyncLimiter

from batchd.config import Deployment
from batchd.engine.adaptive import AdaptiveLimit
from batchd.engine.fair_slots import FairSlots

log = logging.getLogger(__name__)


class DeploymentLimiter:
    """Requests in flight are shared fairly between the projects and batches that wait
    (:class:`FairSlots`; ``weight(project)`` from ``[projects.NAME] weight``)."""

    def __init__(
        self,
        deployment: Deployment,
        *,
        capacity: int | None = None,
        weight: Callable[[str], float] = lambda _: 1.0,
    ) -> None:
        self.model = deployment.model
        self.max_concurrency = deployment.concurrency_limit
        self._rpm_max = deployment.rpm
        self._tpm_max = deployment.tpm
        self._slots = FairSlots(0, weight)
        self._leased = 0  # this process's share of the cluster's limit
        # max_concurrency = "auto": the engine finds the limit, within the leased share
        self.adaptive = AdaptiveLimit(cap=self.max_concurrency) if deployment.adaptive else None
        self._rpm: AsyncLimiter | None = None
        self._tpm: AsyncLimiter | None = None
        self._tpm_local = 0
        self.paused_until = 0.0  # unix seconds: a ``retry-after`` holds every sender till then
        # Called when the adaptive limit rises past the leased share while requests wait:
        # the slot leaser renews at once instead of at its next period (engine/slots.py).
        self.outgrown: Callable[[], None] | None = None
        self.resize(deployment.concurrency_limit if capacity is None else capacity)

    @property
    def capacity(self) -> int:
        return self._slots.capacity

    @property
    def in_flight(self) -> int:
        return self._slots.in_flight

    @property
    def limit(self) -> int:
        """The most requests in flight the deployment takes now: ``max_concurrency``, or
        the adaptive limit (``auto``)."""
        return self.adaptive.current if self.adaptive is not None else self.max_concurrency

    @property
    def want(self) -> int:
        """Slots this process could use now: in flight plus waiting, up to the limit."""
        return min(self.limit, self._slots.in_flight + self._slots.waiting)

    def resize(self, capacity: int) -> None:
        """Set how many requests may be in flight from this process (its leased share).
        Requests already in flight above a smaller capacity finish; no new one starts."""
        self._leased = capacity = max(0, min(capacity, self.max_concurrency))
        capacity = min(capacity, self.limit)
        if capacity != self.capacity:
            self._slots.capacity = capacity
            share = capacity / self.max_concurrency
            rpm = max(1, int(self._rpm_max * share)) if self._rpm_max else 0
            tpm = max(1, int(self._tpm_max * share)) if self._tpm_max else 0
            self._rpm = AsyncLimiter(rpm, 60) if rpm else None
            self._tpm = AsyncLimiter(tpm, 60) if tpm else None
            self._tpm_local = tpm
        self._slots.wake()

    def pause(self, seconds: float) -> None:
        """The upstream asked for a pause (``retry-after``): no request of this deployment
        starts from this process before it ends. A shorter pause never cuts a longer one."""
        self.paused_until = max(self.paused_until, time.time() + seconds)

    def pause_left(self) -> float:
        """Seconds left of the current pause (0 when none)."""
        until = self.paused_until
        return 0.0 if not until else max(0.0, until - time.time())

    def try_acquire(self, project: str = "", batch: str = "") -> bool:
        """Take a slot without waiting: only when one is free, nobody queues for one and no
        per-minute limit applies (the engine's path for nearly every request). Pair with
        :meth:`release` with the same flow."""
        return self._rpm is None and self._tpm is None and self._slots.try_take(project, batch)

    async def acquire(self, tokens: int, project: str = "", batch: str = "") -> None:
        """Wait for a slot (fairly between the flows that wait, first come first served
        within a batch), then for the per-minute limits. Pair with :meth:`release`."""
        await self._slots.take(project, batch)
        try:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None and tokens > 0:
                await self._tpm.acquire(min(tokens, self._tpm_local))
        except BaseException:
            self.release(project, batch)
            raise

    def release(self, project: str = "", batch: str = "") -> None:
        self._slots.give_back(project, batch)

    def project_wants(self) -> dict[str, int]:
        """Slots each project could use now from this process, up to the limit."""
        limit = self.limit
        return {p: min(w, limit) for p, w in self._slots.wants().items()}

    def on_answer(self, seconds: float, status: int, in_flight: int) -> None:
        """Feed the adaptive limit (``auto`` only) with one answer; the capacity follows."""
        adaptive = self.adaptive
        if adaptive is not None and adaptive.on_answer(seconds, status, in_flight):
            log.debug(
                "deployment %s: concurrency limit %d (no-load latency %.3f s, last %.3f s)",
                self.model,
                adaptive.current,
                adaptive.no_load or 0.0,
                adaptive.last_latency,
            )
            self.resize(self._leased)
            if (
                self.outgrown is not None
                and self._leased < adaptive.current
                and self._slots.waiting
                and self._leased < self.max_concurrency
            ):
                self.outgrown()

    def used_by(self, project: str) -> int:
        """Requests of ``project`` in flight from this process."""
        return self._slots.used_by(project)

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int, project: str = "", batch: str = "") -> AsyncIterator[None]:
        """Hold one in-flight slot for the length of one attempt."""
        if not self.try_acquire(project, batch):
            await self.acquire(tokens, project, batch)
        try:
            yield
        finally:
            self.release(project, batch)
