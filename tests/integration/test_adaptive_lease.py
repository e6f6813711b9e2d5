"""An adaptive limit that rises renews the engine's share of the deployment at once: a limit
climbing in slow start is not held back a renewal period (a second) at each doubling."""

from __future__ import annotations

import asyncio

import pytest

from batchd.config import Deployment
from batchd.engine import slots
from batchd.engine.limits import DeploymentLimiter
from batchd.engine.slots import SlotLeaser
from batchd.store.connect import migrate, open_store


async def test_a_rising_adaptive_limit_renews_the_share_at_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Periodic renewals a minute apart: only the rise can bring the share in this test.
    monkeypatch.setattr(slots, "RENEW_SECONDS", 60.0)
    monkeypatch.setattr(slots, "FAST_SECONDS", 60.0)
    await migrate(database_url)
    store = open_store(database_url)
    deployment = Deployment(
        model="m", base_url="http://x", max_concurrency="auto", max_concurrency_cap=256
    )
    lim = DeploymentLimiter(deployment, capacity=0)
    leaser = SlotLeaser(store.slots, "engine-a", [lim], lease_seconds=600)
    waiters = [asyncio.create_task(lim.acquire(0)) for _ in range(100)]
    runner: asyncio.Task[None] | None = None
    try:
        await asyncio.sleep(0)
        await leaser.renew()
        assert lim.capacity == 8 and lim.in_flight == 8  # the adaptive start
        runner = asyncio.create_task(leaser.run())
        await asyncio.sleep(0)
        renewals = leaser.renewals
        for _ in range(8):  # a window of answers at no-load latency: slow start doubles
            lim.release()
            lim.on_answer(0.1, 200, 8)
        assert lim.adaptive is not None and lim.adaptive.current == 16
        # the 8 released slots went to the next 8 waiters; the next 8 get the new ones
        await asyncio.wait_for(asyncio.gather(*waiters[16:24]), 10)
        assert leaser.renewals == renewals + 1
        assert lim.capacity == 16 and lim.in_flight == 16 and not waiters[24].done()
    finally:
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        for w in waiters:
            w.cancel()
        await store.close()
