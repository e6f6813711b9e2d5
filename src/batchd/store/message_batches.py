"""Anthropic's Message Batches in the store: each row names the batch that runs it.

A message batch is one ordinary batch of its project (same engine, quotas and limits); this
table adds what the Anthropic API needs beyond it: its own id (``msgbatch_…``, listed newest
first as ids sort by creation), deletion, and its final request counts once it ended (split
into errored, canceled and expired, which the batch's counters do not tell apart).
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Row, Select, insert, select, update

from batchd.models import BatchRecord
from batchd.store.db import Database
from batchd.store.rows import batch_record
from batchd.store.schema import batches, message_batches
from batchd.store.types import MessageBatchRow


def _row(r: Row[Any]) -> MessageBatchRow:
    m = r._mapping
    counts = orjson.loads(m["mb_counts"]) if m["mb_counts"] else None
    return MessageBatchRow(
        id=m["mb_id"],
        project=m["mb_project"],
        batch_id=m["mb_batch_id"],
        created_at=m["mb_created_at"],
        deleted_at=m["mb_deleted_at"],
        counts=counts,
    )


_MB = message_batches.c
_COLUMNS = (
    _MB.id.label("mb_id"),
    _MB.project.label("mb_project"),
    _MB.batch_id.label("mb_batch_id"),
    _MB.created_at.label("mb_created_at"),
    _MB.deleted_at.label("mb_deleted_at"),
    _MB.counts.label("mb_counts"),
)


class MessageBatchStore:
    """Reads and writes of ``message_batches``, with the batch each row names (one query)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _joined(self, project: str) -> Select[Any]:
        return (
            select(*_COLUMNS, batches)
            .select_from(message_batches.join(batches, batches.c.id == _MB.batch_id))
            .where(_MB.project == project, _MB.deleted_at.is_(None))
        )

    async def insert(self, row: MessageBatchRow) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                insert(message_batches).values(
                    id=row.id, project=row.project, batch_id=row.batch_id, created_at=row.created_at
                )
            )

    async def get(self, project: str, mb_id: str) -> tuple[MessageBatchRow, BatchRecord] | None:
        """The message batch and its batch; None when missing, deleted, or another project's."""
        q = self._joined(project).where(_MB.id == mb_id)
        async with self._db.read() as conn:
            r = (await conn.execute(q)).first()
        return None if r is None else (_row(r), batch_record(r._mapping))

    async def list(
        self, project: str, *, limit: int, after: str | None, before: str | None
    ) -> tuple[list[tuple[MessageBatchRow, BatchRecord]], bool]:
        """Newest first, up to ``limit``, and whether there are more in that direction: older
        than ``after``, or (``before``) the ``limit`` just newer than it."""
        q = self._joined(project)
        if before:
            q = q.where(_MB.id > before).order_by(_MB.id.asc())
        else:
            if after:
                q = q.where(_MB.id < after)
            q = q.order_by(_MB.id.desc())
        async with self._db.read() as conn:
            rows = (await conn.execute(q.limit(limit + 1))).all()
        out = [(_row(r), batch_record(r._mapping)) for r in rows[:limit]]
        return (out[::-1] if before else out), len(rows) > limit

    async def keep_counts(self, mb_id: str, counts: dict[str, int]) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                update(message_batches)
                .where(_MB.id == mb_id)
                .values(counts=orjson.dumps(counts))
            )

    async def mark_deleted(self, project: str, mb_id: str, at: int) -> bool:
        """Hide the message batch; False when it was not there (or deleted already)."""
        async with self._db.write() as conn:
            res = await conn.execute(
                update(message_batches)
                .where(_MB.id == mb_id, _MB.project == project, _MB.deleted_at.is_(None))
                .values(deleted_at=at)
            )
        return bool(res.rowcount)
