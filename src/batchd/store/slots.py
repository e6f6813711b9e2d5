"""Cluster-wide deployment limits: shares of a deployment's in-flight slots, leased by engines.

Every engine process holds one row per deployment in ``deployment_slots``: how many slots it
wants (requests in flight or waiting, up to the limit) and how many it may use. It renews the
row with its heartbeat, in one transaction for all deployments; a row whose lease lapsed (a
crashed process) frees its slots for the others. The sum of the rows never exceeds the
limit: a process takes only slots nobody holds, and gives back only slots it does not use,
so a rebalance (a worker comes or goes) never puts more requests in flight than allowed.
PostgreSQL serialises the renewals with a transaction-level advisory lock, SQLite with its
write lock. Cost: one transaction per process per heartbeat, none per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.schema import deployment_slots

# Any fixed 64-bit number: the advisory lock that serialises slot renewals.
_SLOTS_LOCK = 0x62617463686401


@dataclass(frozen=True, slots=True)
class SlotDemand:
    """What one process asks of a deployment: ``limit`` is the deployment's
    ``max_concurrency``, ``want`` what it could use now, ``in_flight`` what it uses."""

    limit: int
    want: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class SlotGrant:
    slots: int  # what the process holds (its fair share, or more while its excess drains)
    target: int  # its fair share; ``slots < target`` until others hand back what they hold

    @property
    def capacity(self) -> int:
        """What the process may have in flight: never above its fair share, so that what it
        holds beyond it drains and is handed back at the next renewal."""
        return min(self.slots, self.target)

    @property
    def settled(self) -> bool:
        return self.slots == self.target


def fair_shares(limit: int, wants: dict[str, int]) -> dict[str, int]:
    """Max-min fair division of ``limit`` slots (water-filling); ties by owner name."""
    shares: dict[str, int] = {}
    left = limit
    order = sorted(wants, key=lambda o: (wants[o], o))
    for k, owner in enumerate(order):
        shares[owner] = min(wants[owner], left // (len(order) - k))
        left -= shares[owner]
    for owner in sorted(wants):
        if left <= 0:
            break
        if shares[owner] < wants[owner]:
            shares[owner] += 1
            left -= 1
    return shares


def grant(me: str, demand: SlotDemand, others: dict[str, tuple[int, int]]) -> SlotGrant:
    """``others``: owner -> (want, slots) of the other live leases of the deployment."""
    wants = {o: w for o, (w, _) in others.items()}
    wants[me] = min(demand.want, demand.limit)
    target = fair_shares(demand.limit, wants)[me]
    free = max(0, demand.limit - sum(s for _, s in others.values()))
    # Keep the slots in use (they are ours already, and drain down to the fair share), take
    # free ones up to the fair share.
    return SlotGrant(min(free, max(target, demand.in_flight)), target)


async def lease(
    conn: AsyncConnection,
    owner: str,
    demands: dict[str, SlotDemand],
    now: float,
    until: float,
) -> dict[str, SlotGrant]:
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SLOTS_LOCK})
    t = deployment_slots
    await conn.execute(delete(t).where(t.c.until < now))
    await conn.execute(delete(t).where(t.c.owner == owner))
    rows = await conn.execute(
        select(t.c.deployment, t.c.owner, t.c.want, t.c.slots).where(
            t.c.deployment.in_(list(demands))
        )
    )
    others: dict[str, dict[str, tuple[int, int]]] = {d: {} for d in demands}
    for r in rows:
        others[r.deployment][r.owner] = (r.want, r.slots)
    grants = {d: grant(owner, demands[d], others[d]) for d in demands}
    if grants:
        await conn.execute(
            insert(t),
            [
                {
                    "deployment": d,
                    "owner": owner,
                    "want": min(demands[d].want, demands[d].limit),
                    "slots": g.slots,
                    "until": until,
                }
                for d, g in grants.items()
            ],
        )
    return grants


async def release(conn: AsyncConnection, owner: str) -> None:
    await conn.execute(delete(deployment_slots).where(deployment_slots.c.owner == owner))
