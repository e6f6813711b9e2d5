"""The webhook outbox in the SQL store (:class:`batchd.store.protocols.OutboxStore`).

Events are written by :func:`batchd.store.rows.record_event` in the transaction that ended
their batch, so none is lost and none is sent for a batch that did not end."""

from __future__ import annotations

from sqlalchemy import select, update

from batchd.models import BatchEvent
from batchd.store.db import Database
from batchd.store.schema import events


class SqlOutboxStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def claim_events(
        self, now: float, lease_seconds: float, limit: int = 50
    ) -> list[BatchEvent]:
        """Events due for delivery, leased by pushing their next attempt past the lease."""
        async with self._db.write() as conn:
            q = (
                select(events)
                .where(events.c.delivered_at.is_(None), events.c.next_attempt_at <= now)
                .order_by(events.c.id)
                .limit(limit)
                .with_for_update(**self._db.skip_locked())
            )
            rows = (await conn.execute(q)).mappings().all()
            if not rows:
                return []
            await conn.execute(
                update(events)
                .where(events.c.id.in_([r["id"] for r in rows]))
                .values(next_attempt_at=now + lease_seconds)
            )
        return [
            BatchEvent(
                r["id"], r["project"], r["batch_id"], r["type"], r["created_at"], r["attempts"]
            )
            for r in rows
        ]

    async def event_done(self, event_id: str, at: int) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                update(events).where(events.c.id == event_id).values(delivered_at=at)
            )

    async def event_retry(self, event_id: str, attempts: int, next_at: float | None) -> None:
        """Record a failed delivery; ``next_at`` None gives up on the event."""
        async with self._db.write() as conn:
            await conn.execute(
                update(events)
                .where(events.c.id == event_id)
                .values(attempts=attempts, next_attempt_at=next_at)
            )
