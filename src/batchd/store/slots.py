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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.db import Database
from batchd.store.schema import deployment_slots

_projects = msgspec.json.Decoder(dict[str, int])

# Any fixed 64-bit number: the advisory lock that serialises slot renewals.
_SLOTS_LOCK = 0x62617463686401


def even(_project: str) -> float:
    """Every project's weight when none is configured."""
    return 1.0


@dataclass(frozen=True, slots=True)
class SlotDemand:
    """What one process asks of a deployment: ``limit`` is the deployment's
    ``max_concurrency``, ``want`` what it could use now, ``in_flight`` what it uses."""

    limit: int
    want: int
    in_flight: int
    projects: Mapping[str, int] = field(default_factory=dict)  # want by project

    def by_project(self) -> dict[str, int]:
        """The want split by project (one unnamed project when none is given)."""
        wants = {p: min(w, self.limit) for p, w in self.projects.items() if w > 0}
        return wants or ({"": min(self.want, self.limit)} if self.want > 0 else {})


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


def fair_shares(
    limit: int, wants: dict[str, int], weight: Callable[[str], float] = even
) -> dict[str, int]:
    """Weighted max-min fair division of ``limit`` slots: a key gets at most its want, and
    the rest is shared in proportion to the weights (water-filling); the slots left by rounding
    go one by one to the key at the lowest weighted level. Sums to ``min(limit, sum(wants))``."""
    shares = dict.fromkeys(wants, 0)
    active = {k for k, w in wants.items() if w > 0}
    left = limit
    while active and left > 0:
        total = sum(weight(k) for k in active)
        level = {k: left * weight(k) / total for k in active}
        full = {k for k in active if wants[k] - shares[k] <= level[k]}
        if not full:
            for k in active:
                shares[k] += int(level[k])
            for _ in range(limit - sum(shares.values())):  # fewer than len(active)
                k = min(active, key=lambda k: (shares[k] / weight(k), k))
                shares[k] += 1
            break
        for k in full:
            left -= wants[k] - shares[k]
            shares[k] = wants[k]
        active -= full
    return shares


def grant(
    me: str,
    demand: SlotDemand,
    others: dict[str, tuple[int, int, dict[str, int]]],
    weight: Callable[[str], float] = even,
) -> SlotGrant:
    """``others``: owner -> (want, slots, want by project) of the other live leases of the
    deployment. The fair share is computed between projects, then within each project
    between the processes that want slots for it."""
    by_owner = {o: projects for o, (_, _, projects) in others.items()}
    by_owner[me] = demand.by_project()
    project_wants: dict[str, int] = {}
    for projects in by_owner.values():
        for p, w in projects.items():
            project_wants[p] = min(demand.limit, project_wants.get(p, 0) + w)
    target = 0
    for p, share in fair_shares(demand.limit, project_wants, weight).items():
        mine = by_owner[me].get(p, 0)
        if mine:
            wants = {o: projects.get(p, 0) for o, projects in by_owner.items()}
            target += fair_shares(share, wants)[me]
    free = max(0, demand.limit - sum(s for _, s, _ in others.values()))
    # Keep the slots in use (they are ours already, and drain down to the fair share), take
    # free ones up to the fair share.
    return SlotGrant(min(free, max(target, demand.in_flight)), target)


def grants_for(
    owner: str,
    demands: dict[str, SlotDemand],
    held: Iterable[tuple[str, str, int, int, dict[str, int]]],
    weight: Callable[[str], float] = even,
) -> dict[str, SlotGrant]:
    """``owner``'s grant for each deployment it asks for, given the other live leases
    ``held``: ``(deployment, owner, want, slots, want by project)``."""
    others: dict[str, dict[str, tuple[int, int, dict[str, int]]]] = {d: {} for d in demands}
    for deployment, other, want, slots, projects in held:
        if deployment not in others or other == owner:
            continue
        if not projects and want > 0:
            projects = {"": want}
        others[deployment][other] = (want, slots, projects)
    return {d: grant(owner, demands[d], others[d], weight) for d in demands}


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
                    "deployment": d,
                    "owner": owner,
                    "want": min(demands[d].want, demands[d].limit),
                    "slots": g.slots,
                    "until": until,
                    "projects": msgspec.json.encode(demands[d].by_project()),
                }
                for d, g in grants.items()
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
