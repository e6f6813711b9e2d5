"""FifoSlots: places handed out first come, first served."""

from __future__ import annotations

import asyncio

from batchd.fifo_slots import FifoSlots


async def test_places_go_in_arrival_order_and_a_cancelled_waiter_gives_its_place_on() -> None:
    slots = FifoSlots(1)
    assert slots.try_take()
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.take()
        order.append(name)

    a = asyncio.create_task(wait("a"))
    b = asyncio.create_task(wait("b"))
    c = asyncio.create_task(wait("c"))
    await asyncio.sleep(0)
    assert slots.waiting == 3 and not slots.try_take()
    b.cancel()  # leaves the line before its turn
    await asyncio.sleep(0)
    slots.give_back()
    await a
    slots.give_back()
    await c
    assert order == ["a", "c"] and slots.in_flight == 1 and slots.waiting == 0
    assert b.cancelled()


async def test_a_place_granted_to_a_waiter_cancelled_before_it_ran_is_not_lost() -> None:
    slots = FifoSlots(1)
    assert slots.try_take()
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give_back()  # granted to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    await asyncio.gather(waiter, return_exceptions=True)
    assert slots.in_flight == 0 and slots.try_take()


async def test_raising_the_capacity_wakes_waiters() -> None:
    slots = FifoSlots(0)
    waiters = [asyncio.create_task(slots.take()) for _ in range(3)]
    await asyncio.sleep(0)
    slots.capacity = 2
    slots.wake()
    await asyncio.sleep(0)
    assert [w.done() for w in waiters] == [True, True, False]
    assert slots.in_flight == 2
    waiters[2].cancel()
