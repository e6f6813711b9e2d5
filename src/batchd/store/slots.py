"""Cluster-wide deployment limits: shares of a deployment's in-flight slots, leased by engines.

Every engine process holds one row per deployment in ``deployment_slots``: how many slots it
wants (requests in flight or waiting, up to the limit), for which projects, and how many it
may use. Shares are fair between projects first (weighted max-min over the projects' wants
summed over all processes: ``[projects.NAME] weight``), then, within a project, between the
processes that run its work; so a project's share does not depend on how many processes run
it. It renews the
row with its heartbeat, in one transaction for all deployments; a row whose lease lapsed (a
crashed process) frees its slots for the others. The sum of the rows never exceeds the
limit: a process takes only slots nobody holds, and gives back only slots it does not use,
so a rebalance (a worker comes or goes) never puts more requests in flight than allowed.
PostgreSQL serialises the renewals with a transaction-level advisory lock, SQLite with its
write lock. Cost: one transaction per process per heartbeat, none per request.

The division and the rows, pure and shared with the memory store, are in
:mod:`batchd.store.types` (:func:`~batchd.store.types.grants_for`,
:func:`~batchd.store.types.slot_leases`); this module reads and writes them.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.db import Database
from batchd.store.schema import deployment_slots
from batchd.store.types import SlotDemand, SlotGrant, even, grants_for, slot_leases

_projects = msgspec.json.Decoder(dict[str, int])

# Any fixed 64-bit number: the advisory lock that serialises slot renewals.
_SLOTS_LOCK = 0x62617463686401


async def lease(
    conn: AsyncConnection,
    owner: str,
    demands: dict[str, SlotDemand],
    now: float,
    until: float,
    weight: Callable[[str], float] = even,
) -> dict[str, SlotGrant]:
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SLOTS_LOCK})
    t = deployment_slots
    await conn.execute(delete(t).where(t.c.until < now))
    await conn.execute(delete(t).where(t.c.owner == owner))
    rows = await conn.execute(
        select(t.c.deployment, t.c.owner, t.c.want, t.c.slots, t.c.projects).where(
            t.c.deployment.in_(list(demands))
        )
    )
    held = [
        (r.deployment, r.owner, r.want, r.slots, _projects.decode(r.projects) if r.projects else {})
        for r in rows
    ]
    grants = grants_for(owner, demands, held, weight)
    if grants:
        await conn.execute(
            insert(t),
            [
                {
                    "deployment": row.deployment,
                    "owner": owner,
                    "want": row.want,
                    "slots": row.slots,
                    "until": until,
                    "projects": msgspec.json.encode(row.projects),
                }
                for row in slot_leases(demands, grants)
            ],
        )
    return grants


async def release(conn: AsyncConnection, owner: str) -> None:
    await conn.execute(delete(deployment_slots).where(deployment_slots.c.owner == owner))


class SqlSlotStore:
    """The slot leases in the SQL store (:class:`batchd.store.protocols.SlotStore`)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def lease_slots(
        self,
        owner: str,
        demands: dict[str, SlotDemand],
        now: float,
        until: float,
        weight: Callable[[str], float] = even,
    ) -> dict[str, SlotGrant]:
        """Renew this process's shares of the deployments' slots; one transaction.
        ``weight(project)``: the projects' relative shares."""
        async with self._db.write() as conn:
            return await lease(conn, owner, demands, now, until, weight)

    async def live_engines(self, now: float) -> int:
        """Engine processes alive now: each renews its slot leases every second or so
        (``deployment_slots``), so a process with an unexpired lease is running."""
        t = deployment_slots
        q = select(func.count(func.distinct(t.c.owner))).where(t.c.until >= now)
        async with self._db.read() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def release_slots(self, owner: str) -> None:
        async with self._db.write() as conn:
            await release(conn, owner)
