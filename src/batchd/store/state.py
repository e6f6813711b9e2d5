"""What the store says about the queue, for ``/metrics`` and the dashboard: batches by
status, shards waiting or leased, requests left, and the deployments' slot leases.

Read at scrape time, so the figures are the cluster's, whichever replica answers. Each is
one aggregate over an indexed column (``ix_batches_status``, ``ix_shards_claim``,
the primary key of ``deployment_slots``).
"""

from __future__ import annotations

import msgspec
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.models import CANCELLING, FINALIZING, IN_PROGRESS, SHARD_PENDING
from batchd.store.schema import batches, deployment_slots, shards
from batchd.store.types import QueueState, SlotUse


async def read(conn: AsyncConnection, now: float) -> QueueState:
    by_status = await conn.execute(
        select(batches.c.status, func.count()).group_by(batches.c.status)
    )
    leased = shards.c.lease_until.is_not(None) & (shards.c.lease_until >= now)
    pending = (
        await conn.execute(
            select(leased.label("leased"), func.count())
            .where(
                shards.c.status == SHARD_PENDING,
                shards.c.batch_id.in_(select(batches.c.id).where(batches.c.status == IN_PROGRESS)),
            )
            .group_by(leased)
        )
    ).all()
    left = await conn.execute(
        select(
            func.coalesce(func.sum(batches.c.total - batches.c.completed - batches.c.failed), 0)
        ).where(batches.c.status.in_((IN_PROGRESS, FINALIZING, CANCELLING)))
    )
    t = deployment_slots
    slot_rows = await conn.execute(
        select(t.c.deployment, func.count(), func.sum(t.c.want), func.sum(t.c.slots))
        .where(t.c.until >= now)
        .group_by(t.c.deployment)
    )
    wants: dict[str, dict[str, int]] = {}
    for d, projects in await conn.execute(
        select(t.c.deployment, t.c.projects).where(t.c.until >= now, t.c.projects.is_not(None))
    ):
        for project, want in msgspec.json.decode(projects, type=dict[str, int]).items():
            wants.setdefault(d, {})[project] = wants.get(d, {}).get(project, 0) + want
    return QueueState(
        batches={status: int(n) for status, n in by_status},
        shards_waiting=sum(int(n) for is_leased, n in pending if not is_leased),
        shards_leased=sum(int(n) for is_leased, n in pending if is_leased),
        requests_left=int(left.scalar_one()),
        slots={d: SlotUse(int(p), int(w or 0), int(s or 0)) for d, p, w, s in slot_rows},
        project_wants=wants,
    )
