"""FairSlots: a deployment's places shared between projects and batches, work-conserving."""

from __future__ import annotations

import asyncio

from batchd.engine.fair_slots import FairSlots


async def test_alone_a_flow_uses_every_place() -> None:
    slots = FairSlots(4)
    assert all(slots.try_take("a", "a1") for _ in range(4))
    assert not slots.try_take("a", "a1") and slots.in_flight == 4
    for _ in range(4):
        slots.give_back("a", "a1")
    assert slots.in_flight == 0 and slots.used_by("a") == 0


async def test_a_newcomer_gets_the_next_free_places() -> None:
    """A big project holds every place and queues more; a small project's requests, queued
    after them, get the places as they free up, until the two are even."""
    slots = FairSlots(4)
    for _ in range(4):
        assert slots.try_take("big", "b1")
    flows = [("big", "b1")] * 6 + [("small", "s1")] * 2
    got: list[tuple[str, str]] = []

    async def wait(flow: tuple[str, str]) -> None:
        await slots.take(*flow)
        got.append(flow)

    tasks = [asyncio.create_task(wait(f)) for f in flows]
    await asyncio.sleep(0)
    slots.give_back("big", "b1")
    await asyncio.sleep(0)
    slots.give_back("big", "b1")
    await asyncio.sleep(0)
    assert got == [("small", "s1"), ("small", "s1")]  # not behind big's six waiters
    assert slots.used_by("small") == 2 and slots.used_by("big") == 2
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_weights_and_batches_within_a_project() -> None:
    weights = {"heavy": 2.0, "light": 1.0}
    slots = FairSlots(3, lambda p: weights.get(p, 1.0))
    held = [("heavy", "h1"), ("light", "l1"), ("light", "l2")]
    for flow in held:
        assert slots.try_take(*flow)
    got: list[tuple[str, str]] = []

    async def wait(flow: tuple[str, str]) -> None:
        await slots.take(*flow)
        got.append(flow)

    queued = [("light", "l1")] * 3 + [("heavy", "h1")] * 3
    tasks = [asyncio.create_task(wait(f)) for f in queued]
    await asyncio.sleep(0)
    slots.give_back("light", "l2")  # light 1, heavy 1: heavy's 1/2 < light's 1/1
    await asyncio.sleep(0)
    assert got == [("heavy", "h1")]
    slots.give_back("light", "l1")  # light 0: light's turn
    await asyncio.sleep(0)
    assert got[-1] == ("light", "l1")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert slots.waiting == 0


async def test_within_a_project_the_batch_using_least_goes_first() -> None:
    slots = FairSlots(2)
    assert slots.try_take("p", "old") and slots.try_take("p", "old")
    got: list[str] = []

    async def wait(batch: str) -> None:
        await slots.take("p", batch)
        got.append(batch)

    tasks = [asyncio.create_task(wait(b)) for b in ("old", "old", "new")]
    await asyncio.sleep(0)
    slots.give_back("p", "old")
    await asyncio.sleep(0)
    assert got == ["new"]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_cancelled_waiters_leave_no_trace() -> None:
    slots = FairSlots(1)
    assert slots.try_take("a", "a1")
    task = asyncio.create_task(slots.take("b", "b1"))
    await asyncio.sleep(0)
    assert slots.waiting == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert slots.waiting == 0
    slots.give_back("a", "a1")
    assert slots.in_flight == 0 and slots.try_take("c", "c1")
