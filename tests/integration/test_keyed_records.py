"""Idempotency keys and named leases hold across replicas (two stores on one database), in
memory, on SQLite and PostgreSQL (issue 12 items 4 and 5)."""

from __future__ import annotations

import asyncio

from batchd.store.protocols import Store


async def test_one_of_many_concurrent_claims_wins(replicas: tuple[Store, Store]) -> None:
    keys = [s.keys for s in replicas]
    states = await asyncio.gather(
        *(keys[i % 2].claim("p", "batch", "k", "fp", 1000) for i in range(10))
    )
    assert sorted(s.claim for s in states) == ["in_flight"] * 9 + ["new"]
    await keys[0].finish("p", "batch", "k", "batch_1")
    assert (await keys[1].claim("p", "batch", "k", "fp", 1001)).result_id == "batch_1"
    assert (await keys[1].claim("p", "batch", "k", "other", 1001)).claim == "conflict"
    # Per project and per kind; a key past 24 h is free again.
    assert (await keys[1].claim("q", "batch", "k", "other", 1001)).claim == "new"
    assert (await keys[1].claim("p", "file", "k", "other", 1001)).claim == "new"
    assert (await keys[0].claim("p", "batch", "k", "other", 1000 + 86400)).claim == "new"
    assert await keys[0].forget_lapsed(1000 + 2 * 86400) == 3


async def test_a_released_or_stale_key_runs_again(replicas: tuple[Store, Store]) -> None:
    keys = replicas[0].idempotency_keys(86400, 60)
    assert (await keys.claim("p", "file", "k", "fp", 0)).claim == "new"
    await keys.release("p", "file", "k")
    assert (await keys.claim("p", "file", "k", "fp", 1)).claim == "new"
    assert (await keys.claim("p", "file", "k", "fp", 30)).claim == "in_flight"
    assert (await keys.claim("p", "file", "k", "fp", 61)).claim == "new"  # its holder died


async def test_a_lease_has_one_holder_until_it_lapses(replicas: tuple[Store, Store]) -> None:
    a, b = replicas[0].leases, replicas[1].leases
    got = await asyncio.gather(
        *((a if i % 2 else b).acquire("reaper", f"owner-{i}", 100.0, 30.0) for i in range(8))
    )
    assert got.count(True) == 1
    holder = f"owner-{got.index(True)}"
    assert await a.acquire("reaper", holder, 110.0, 30.0)  # renewed by its holder
    assert not await b.acquire("reaper", "other", 139.0, 30.0)
    assert await b.acquire("reaper", "other", 141.0, 30.0)  # lapsed: taken over
    await a.release("reaper", holder)  # not its holder any more: nothing happens
    assert not await a.acquire("reaper", holder, 142.0, 30.0)
    await b.release("reaper", "other")
    assert await a.acquire("reaper", holder, 143.0, 30.0)
