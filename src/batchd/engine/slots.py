"""Keeping this process's shares of the deployments' slots (see :mod:`batchd.store.slots`).

Renewed every second (or every third of a lease, if shorter), and every quarter second
while a share is unsettled (this process holds more than its fair share and drains it, or
less and waits for others to hand theirs back) or a limiter has waiters and no slots; at
once (at most every ``SOON_SECONDS``) when an adaptive limit rises past the share held, so
that a limit climbing in slow start is not held back a renewal period at each step;
released on a clean exit. A crashed process's shares return when its lease lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from batchd.engine.limits import DeploymentLimiter
from batchd.store.protocols import SlotStore
from batchd.store.types import SlotDemand, even

log = logging.getLogger(__name__)

FAST_SECONDS = 0.25
# How soon a process hears that others want slots it holds: a starved newcomer waits at most
# this long (plus the time its in-flight requests take to drain) for its share.
RENEW_SECONDS = 1.0
# The least time between two renewals asked for by a rising adaptive limit.
SOON_SECONDS = 0.05


class SlotLeaser:
    def __init__(
        self,
        store: SlotStore,
        owner: str,
        limiters: list[DeploymentLimiter],
        lease_seconds: float,
        weight: Callable[[str], float] = even,
    ) -> None:
        self._store = store
        self._weight = weight
        self._owner = owner
        self._limiters = {lim.model: lim for lim in limiters}
        self._lease = lease_seconds
        self._short = False
        self._soon = asyncio.Event()
        for lim in limiters:
            lim.outgrown = self._soon.set
        self.renewals = 0
        self._renewed = 0.0  # monotonic seconds: the last renewal

    async def renew(self) -> None:
        demands = {
            m: SlotDemand(lim.max_concurrency, lim.want, lim.in_flight, lim.project_wants())
            for m, lim in self._limiters.items()
        }
        now = time.time()
        grants = await self._store.lease_slots(
            self._owner, demands, now, now + self._lease, self._weight
        )
        self.renewals += 1
        self._renewed = time.monotonic()
        self._short = False
        for model, g in grants.items():
            self._limiters[model].resize(g.capacity)
            # Unsettled: slots to hand back once drained, or to take once others hand them back.
            if not g.settled:
                self._short = True

    def _starved(self) -> bool:
        return any(lim.want > 0 and lim.capacity == 0 for lim in self._limiters.values())

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            period = min(self._lease / 3, RENEW_SECONDS)
            while time.monotonic() - started < period:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._soon.wait(), FAST_SECONDS)
                if self._soon.is_set():
                    self._soon.clear()
                    await asyncio.sleep(self._renewed + SOON_SECONDS - time.monotonic())
                    break
                if self._short or self._starved():
                    break
            try:
                await self.renew()
            except Exception:
                log.exception("renewing deployment slots failed")

    async def release(self) -> None:
        for lim in self._limiters.values():
            lim.resize(0)
        try:
            await self._store.release_slots(self._owner)
        except Exception:
            log.exception("releasing deployment slots failed; they return when the lease lapses")
