"""Batch records in the SQL store (:class:`batchd.store.protocols.BatchStore`): create,
activation with its token quotas, failure and cancel requests; finalising is the queue's
(:mod:`batchd.store.queue`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.errors import QuotaExceeded
from batchd.models import (
    CANCELLING,
    FAILED,
    IN_PROGRESS,
    SHARD_PENDING,
    VALIDATING,
    BatchRecord,
    BatchSignal,
    ShardSpan,
    ValidationIssue,
)
from batchd.store.codec import encode
from batchd.store.db import Database
from batchd.store.rows import NOT_STARTED, batch_record, record_event
from batchd.store.schema import batches, shards
from batchd.store.types import UNFINISHED

# Namespaces of the PostgreSQL advisory locks that make a token quota's check and its take
# one step between replicas (``pg_advisory_xact_lock(namespace, hashtext(key))``). SQLite
# needs none: its write transactions (``BEGIN IMMEDIATE``) already run one at a time.
LOCK_ENQUEUED_TOKENS = 0x62640002  # key: the deployment's model (enqueued_token_limit)
LOCK_PROJECT_TOKENS = 0x62640004  # key: the project ([projects.NAME] enqueued_token_limit)


async def _take_quota(
    conn: AsyncConnection, scope_of: Any, batch_id: str, tokens: int, limit: int, scope: str
) -> None:
    """Raise :class:`QuotaExceeded` when the unfinished batches of ``scope_of`` (a model or
    a project), this one left out, hold so many tokens that ``tokens`` more pass ``limit``."""
    used = (
        await conn.execute(
            select(func.coalesce(func.sum(batches.c.token_estimate), 0)).where(
                scope_of, batches.c.status.in_(UNFINISHED), batches.c.id != batch_id
            )
        )
    ).scalar_one()
    if used + tokens > limit:
        raise QuotaExceeded(f"{used} tokens of {limit}", used=int(used), scope=scope)


class SqlBatchStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_batch(self, rec: BatchRecord) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                insert(batches).values(
                    id=rec.id,
                    project=rec.project,
                    endpoint=rec.endpoint,
                    model=rec.model,
                    input_file_id=rec.input_file_id,
                    input_blob_key=rec.input_blob_key,
                    completion_window=rec.completion_window,
                    status=rec.status,
                    metadata=encode(rec.metadata),
                    output_expires_after=rec.output_expires_after,
                    created_at=rec.created_at,
                    expires_at=rec.expires_at,
                    total=0,
                    completed=0,
                    failed=0,
                    input_tokens=0,
                    cached_tokens=0,
                    output_tokens=0,
                    reasoning_tokens=0,
                    token_estimate=rec.token_estimate,
                    api=rec.api,
                    endpoint_as_sent=rec.endpoint_as_sent,
                )
            )

    async def get_batch(self, batch_id: str, project: str | None = None) -> BatchRecord | None:
        q = select(batches).where(batches.c.id == batch_id)
        if project is not None:
            q = q.where(batches.c.project == project)
        async with self._db.read() as conn:
            row = (await conn.execute(q)).mappings().first()
        return batch_record(row) if row else None

    async def list_batches(
        self, project: str | None, *, limit: int, after: str | None, status: str | None = None
    ) -> list[BatchRecord]:
        """Newest first, up to ``limit + 1``; of every project when ``project`` is None,
        of one status when ``status`` is given."""
        q = select(batches)
        if project is not None:
            q = q.where(batches.c.project == project)
        if status is not None:
            q = q.where(batches.c.status == status)
        if after:
            q = q.where(batches.c.id < after)
        q = q.order_by(batches.c.id.desc()).limit(limit + 1)
        async with self._db.read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [batch_record(r) for r in rows]

    async def validating_batches(self, file_id: str | None = None) -> list[BatchRecord]:
        """Batches waiting for their start: ``validating``, or cancelled while validating
        (``cancelling`` with no shard yet: their lines must still be listed as cancelled)."""
        q = select(batches).where(NOT_STARTED)
        if file_id is not None:
            q = q.where(batches.c.input_file_id == file_id)
        async with self._db.read() as conn:
            rows = (await conn.execute(q.limit(100))).mappings().all()
        return [batch_record(r) for r in rows]

    async def enqueued_tokens(self, model: str) -> int:
        q = select(func.coalesce(func.sum(batches.c.token_estimate), 0)).where(
            batches.c.model == model, batches.c.status.in_(UNFINISHED)
        )
        async with self._db.read() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def delete_unstarted_batch(self, batch_id: str) -> None:
        """Remove a batch still ``validating`` (one whose create did not finish)."""
        async with self._db.write() as conn:
            await conn.execute(
                delete(batches).where(batches.c.id == batch_id, batches.c.status == VALIDATING)
            )

    async def fail_started_batch(self, batch_id: str, issue: ValidationIssue, at: int) -> bool:
        """End an unfinished batch ``failed`` for an internal reason (its handling kept
        failing); its shards are no longer claimed. False if it had ended already."""
        async with self._db.write() as conn:
            res = await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status.in_(UNFINISHED))
                .values(
                    status=FAILED,
                    failed_at=at,
                    errors=encode([issue]),
                    final_owner=None,
                    final_until=None,
                    output_file_id=None,
                    error_file_id=None,
                )
            )
            if res.rowcount:
                await record_event(conn, batch_id, FAILED, at)
            return bool(res.rowcount)

    async def activate_batch(
        self,
        batch_id: str,
        *,
        model: str | None,
        spans: Sequence[ShardSpan],
        token_estimate: int,
        at: int,
        token_limit: int = 0,
        project_token_limit: int = 0,
    ) -> bool:
        """validating -> in_progress, creating the batch's shards. A batch cancelled while
        validating gets its shards too but stays ``cancelling``: the finaliser then lists
        every line as ``batch_cancelled``. False if it is started or ended already.

        With ``token_limit``, the model's enqueued tokens (the estimates of its unfinished
        batches) plus this one's must stay within it: checked and taken in this one
        transaction under a per-model lock, so two batches activated at once on any
        replicas cannot both pass. ``project_token_limit`` holds the same way for the
        project's unfinished batches, every model together (locked after the model's lock,
        always in that order). Raises :class:`QuotaExceeded` (nothing changed, ``scope``
        "deployment" or "project") if not."""
        async with self._db.write() as conn:
            checked = bool(token_limit) and model is not None
            if checked:
                assert model is not None
                await self._db.lock(conn, LOCK_ENQUEUED_TOKENS, model)
            project = None
            if project_token_limit:
                project = (
                    await conn.execute(select(batches.c.project).where(batches.c.id == batch_id))
                ).scalar_one_or_none()
                if project is not None:
                    await self._db.lock(conn, LOCK_PROJECT_TOKENS, project)
            res = await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status == VALIDATING)
                .values(
                    status=IN_PROGRESS,
                    in_progress_at=at,
                    model=model,
                    total=sum(s.count for s in spans),
                    token_estimate=token_estimate,
                )
            )
            if res.rowcount and checked:  # a QuotaExceeded rolls the move back
                await _take_quota(
                    conn, batches.c.model == model, batch_id, token_estimate, token_limit,
                    "deployment",
                )
            if res.rowcount and project is not None:
                await _take_quota(
                    conn, batches.c.project == project, batch_id, token_estimate,
                    project_token_limit, "project",
                )
            if not res.rowcount:
                res = await conn.execute(
                    update(batches)
                    .where(batches.c.id == batch_id, NOT_STARTED)
                    .values(model=model, total=sum(s.count for s in spans))
                )
            if not res.rowcount:
                return False
            if spans:
                await conn.execute(
                    insert(shards),
                    [
                        {
                            "batch_id": batch_id,
                            "idx": i,
                            "start_offset": s.start,
                            "end_offset": s.end,
                            "first_line": s.first_line,
                            "line_count": s.count,
                            "status": SHARD_PENDING,
                            "token": 0,
                            "done": bytes((s.count + 7) // 8),
                            "part_seq": 0,
                        }
                        for i, s in enumerate(spans)
                    ],
                )
            return True

    async def fail_batch(
        self, batch_id: str, issues: list[ValidationIssue], at: int, *, model: str | None = None
    ) -> bool:
        async with self._db.write() as conn:
            res = await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, NOT_STARTED)
                .values(status=FAILED, failed_at=at, errors=encode(issues), model=model)
            )
            if res.rowcount:
                await record_event(conn, batch_id, FAILED, at)
            return bool(res.rowcount)

    async def request_cancel(self, batch_id: str, project: str, at: int) -> BatchRecord | None:
        """Move an unfinished batch to ``cancelling``; return it as it is afterwards."""
        async with self._db.write() as conn:
            await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.project == project,
                    batches.c.status.in_((VALIDATING, IN_PROGRESS)),
                )
                .values(status=CANCELLING, cancelling_at=at)
            )
            row = (
                (
                    await conn.execute(
                        select(batches).where(
                            batches.c.id == batch_id, batches.c.project == project
                        )
                    )
                )
                .mappings()
                .first()
            )
        return batch_record(row) if row else None

    async def signals(self, batch_ids: Iterable[str]) -> dict[str, BatchSignal]:
        ids = list(set(batch_ids))
        if not ids:
            return {}
        q = select(batches.c.id, batches.c.status, batches.c.expires_at).where(
            batches.c.id.in_(ids)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(q)).all()
        return {r.id: BatchSignal(r.id, r.status, r.expires_at) for r in rows}
