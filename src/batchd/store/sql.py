"""The metadata store and work queue on SQLAlchemy Core: SQLite and PostgreSQL, one contract.

Every public method is one transaction. SQLite: all writes of a process go through one
connection with ``BEGIN IMMEDIATE`` (no "database is locked" between our own tasks; other
processes wait on ``busy_timeout``), reads use a small pool of their own in WAL mode.
PostgreSQL: one pool; claims use ``FOR UPDATE SKIP LOCKED`` so that workers never wait on
each other. Driver errors become :class:`batchd.errors.StoreError` here and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, exists, func, insert, or_, select, text, tuple_, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd.errors import LeaseLost, QuotaExceeded, StoreError
from batchd.models import (
    API_OPENAI,
    CANCELLING,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    SHARD_DONE,
    SHARD_PENDING,
    TERMINAL,
    VALIDATING,
    BatchEvent,
    BatchRecord,
    BatchSignal,
    FileRecord,
    Part,
    ShardClaim,
    ShardSpan,
    Usage,
    ValidationIssue,
    new_id,
)
from batchd.store import slots, state
from batchd.store.codec import decode_issues, decode_metadata, decode_summary, encode
from batchd.store.schema import batches, deployment_slots, events, files, parts, shards
from batchd.store.slots import SlotDemand, SlotGrant

UNFINISHED = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)
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


def _held(claim: ShardClaim) -> Any:
    """The claimed shard, while the claim's token still holds it (the fence)."""
    return and_(
        shards.c.batch_id == claim.batch_id,
        shards.c.idx == claim.idx,
        shards.c.token == claim.token,
        shards.c.status == SHARD_PENDING,
    )


def _finalising(batch_id: str, owner: str) -> Any:
    """The batch, while ``owner`` holds its finalising lease and it has not ended."""
    return and_(
        batches.c.id == batch_id,
        batches.c.final_owner == owner,
        batches.c.status.not_in(tuple(TERMINAL)),
    )


_HAS_SHARDS = exists().where(shards.c.batch_id == batches.c.id)
# Not started: validating, or cancelled before its shards were made.
_NOT_STARTED = or_(
    batches.c.status == VALIDATING, and_(batches.c.status == CANCELLING, ~_HAS_SHARDS)
)

# Namespaces of the PostgreSQL advisory locks that make a limit's check and its take one
# step between replicas (``pg_advisory_xact_lock(namespace, hashtext(key))``). SQLite needs
# none: its write transactions (``BEGIN IMMEDIATE``) already run one at a time.
LOCK_FILE_COUNT = 0x62640001  # key: the project (limits.max_files)
LOCK_ENQUEUED_TOKENS = 0x62640002  # key: the deployment's model (enqueued_token_limit)
LOCK_PROJECT_TOKENS = 0x62640004  # key: the project ([projects.NAME] enqueued_token_limit)


@dataclass(frozen=True, slots=True)
class ShardCheckpoint:
    """What one checkpoint stores for a shard (see :meth:`Store.checkpoint_many`)."""

    claim: ShardClaim
    done: bytes  # the done-bitmap matching every result stored so far, ``part`` included
    part: Part | None  # the results since the last checkpoint, if any
    usage: Usage  # their usage, added to the batch's counters
    shard_done: bool  # every line has a result: the shard ends
    release: bool = False  # the holder stops: the lease ends
    not_before: float | None = None  # with ``release``: not claimed again before (parked)


def _file(row: RowMapping, *, with_summary: bool = True) -> FileRecord:
    return FileRecord(
        id=row["id"],
        project=row["project"],
        filename=row["filename"],
        purpose=row["purpose"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        status=row["status"],
        blob_key=row["blob_key"],
        expires_at=row["expires_at"],
        status_details=row["status_details"],
        summary=decode_summary(row["summary"]) if with_summary else None,
    )


def _batch(row: RowMapping) -> BatchRecord:
    return BatchRecord(
        id=row["id"],
        project=row["project"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=row["status"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        input_blob_key=row["input_blob_key"],
        model=row["model"],
        metadata=decode_metadata(row["metadata"]),
        output_expires_after=row["output_expires_after"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        errors=decode_issues(row["errors"]),
        in_progress_at=row["in_progress_at"],
        finalizing_at=row["finalizing_at"],
        completed_at=row["completed_at"],
        failed_at=row["failed_at"],
        expired_at=row["expired_at"],
        cancelling_at=row["cancelling_at"],
        cancelled_at=row["cancelled_at"],
        total=row["total"],
        completed=row["completed"],
        failed=row["failed"],
        usage=Usage(
            input_tokens=row["input_tokens"],
            cached_tokens=row["cached_tokens"],
            output_tokens=row["output_tokens"],
            reasoning_tokens=row["reasoning_tokens"],
        ),
        token_estimate=row["token_estimate"],
        api=row["api"] or API_OPENAI,
        endpoint_as_sent=row["endpoint_as_sent"],
    )


def _file_values(rec: FileRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "project": rec.project,
        "filename": rec.filename,
        "purpose": rec.purpose,
        "bytes": rec.bytes,
        "created_at": rec.created_at,
        "expires_at": rec.expires_at,
        "status": rec.status,
        "status_details": rec.status_details,
        "blob_key": rec.blob_key,
        "summary": encode(rec.summary),
    }


async def _record_event(conn: AsyncConnection, batch_id: str, status: str, at: int) -> None:
    """Add ``batch.<status>`` to the outbox, in the transaction that ended the batch."""
    project = (
        await conn.execute(select(batches.c.project).where(batches.c.id == batch_id))
    ).scalar_one()
    await conn.execute(
        insert(events).values(
            id=new_id("evt_"),
            project=project,
            batch_id=batch_id,
            type=f"batch.{status}",
            created_at=at,
            attempts=0,
            next_attempt_at=0.0,
        )
    )


async def _commit_parts(
    conn: AsyncConnection, batch_id: str, new_parts: Sequence[Part], usage: Usage
) -> None:
    """Add ``new_parts`` (in this order) to a batch, with their counts and ``usage`` added to
    its counters, inside the caller's transaction. Positions come from the batch row's
    ``completed + failed`` as the update leaves it, read under that row's lock (the update
    takes it on PostgreSQL; SQLite runs one write transaction at a time), so positions are
    contiguous and in commit order across processes."""
    out = sum(p.out_lines for p in new_parts)
    err = sum(p.err_lines for p in new_parts)
    row = (
        await conn.execute(
            update(batches)
            .where(batches.c.id == batch_id)
            .values(
                completed=batches.c.completed + out,
                failed=batches.c.failed + err,
                input_tokens=batches.c.input_tokens + usage.input_tokens,
                cached_tokens=batches.c.cached_tokens + usage.cached_tokens,
                output_tokens=batches.c.output_tokens + usage.output_tokens,
                reasoning_tokens=batches.c.reasoning_tokens + usage.reasoning_tokens,
            )
            .returning(batches.c.completed, batches.c.failed)
        )
    ).one()
    pos = row.completed + row.failed - out - err
    rows = []
    for p in new_parts:
        rows.append(
            {
                "batch_id": batch_id,
                "shard_idx": p.shard_idx,
                "seq": p.seq,
                "blob_key": p.key,
                "out_lines": p.out_lines,
                "err_lines": p.err_lines,
                "first_pos": pos,
            }
        )
        pos += p.lines
    if rows:
        await conn.execute(insert(parts), rows)


def _part(r: RowMapping) -> Part:
    return Part(
        r["batch_id"],
        r["shard_idx"],
        r["seq"],
        r["blob_key"],
        r["out_lines"],
        r["err_lines"],
        r["first_pos"],
    )


class Store:
    """Metadata and the work queue. Build with :func:`batchd.store.open_store`."""

    def __init__(self, writer: AsyncEngine, reader: AsyncEngine) -> None:
        self._writer = writer
        self._reader = reader
        self.dialect = writer.dialect.name

    async def close(self) -> None:
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()

    # -- transactions ------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._writer.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"metadata store write failed: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._reader.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"metadata store read failed: {exc}") from exc

    def _skip_locked(self) -> dict[str, Any]:
        return {"skip_locked": True} if self.dialect == "postgresql" else {}

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(select(1))

    async def _lock(self, conn: AsyncConnection, namespace: int, key: str) -> None:
        """Hold ``(namespace, key)`` until the transaction ends (PostgreSQL; on SQLite the
        write transaction is exclusive already)."""
        if self.dialect == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:ns, hashtext(:key))"),
                {"ns": namespace, "key": key},
            )

    # -- files -------------------------------------------------------------------
    async def insert_file(self, rec: FileRecord, *, max_files: int | None = None) -> None:
        """Record a file. With ``max_files``, only while its project has fewer files (not
        deleted, result files included): counted and taken in this one transaction under a
        per-project lock, so concurrent uploads on any number of replicas never pass the
        limit. Raises :class:`QuotaExceeded` (nothing recorded) at the limit."""
        async with self._write() as conn:
            if max_files is not None:
                await self._lock(conn, LOCK_FILE_COUNT, rec.project)
                used = (
                    await conn.execute(
                        select(func.count()).where(
                            files.c.project == rec.project, files.c.deleted_at.is_(None)
                        )
                    )
                ).scalar_one()
                if used >= max_files:
                    raise QuotaExceeded(f"{used} files of {max_files}", used=int(used))
            await conn.execute(insert(files).values(**_file_values(rec)))

    async def get_file(self, file_id: str, project: str | None = None) -> FileRecord | None:
        q = select(files).where(files.c.id == file_id, files.c.deleted_at.is_(None))
        if project is not None:
            q = q.where(files.c.project == project)
        async with self._read() as conn:
            row = (await conn.execute(q)).mappings().first()
        return _file(row) if row else None

    async def list_files(
        self,
        project: str | None,
        *,
        purpose: str | None,
        limit: int,
        after: str | None,
        order: str,
    ) -> list[FileRecord]:
        """Up to ``limit + 1`` files (the extra one tells whether there are more); of every
        project when ``project`` is None."""
        cols = [c for c in files.c if c.name != "summary"]
        q = select(*cols).where(files.c.deleted_at.is_(None))
        if project is not None:
            q = q.where(files.c.project == project)
        if purpose:
            q = q.where(files.c.purpose == purpose)
        if after:
            q = q.where(files.c.id > after if order == "asc" else files.c.id < after)
        q = q.order_by(files.c.id.asc() if order == "asc" else files.c.id.desc()).limit(limit + 1)
        async with self._read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [_file(r, with_summary=False) for r in rows]

    async def count_files(self, project: str) -> int:
        q = select(func.count()).where(files.c.project == project, files.c.deleted_at.is_(None))
        async with self._read() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def mark_file_deleted(self, file_id: str, project: str, at: int) -> FileRecord | None:
        async with self._write() as conn:
            row = (
                (
                    await conn.execute(
                        select(files).where(
                            files.c.id == file_id,
                            files.c.project == project,
                            files.c.deleted_at.is_(None),
                        )
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            await conn.execute(update(files).where(files.c.id == file_id).values(deleted_at=at))
            return _file(row, with_summary=False)

    async def blob_in_use(self, blob_key: str) -> bool:
        """Whether an unfinished batch still reads this input blob."""
        q = select(
            exists().where(batches.c.input_blob_key == blob_key, batches.c.status.in_(UNFINISHED))
        )
        async with self._read() as conn:
            return bool((await conn.execute(q)).scalar_one())

    async def purge_file(self, file_id: str) -> None:
        async with self._write() as conn:
            await conn.execute(delete(files).where(files.c.id == file_id))

    async def deleted_files_unreferenced(self, limit: int = 100) -> list[FileRecord]:
        referenced = exists().where(
            batches.c.input_blob_key == files.c.blob_key, batches.c.status.in_(UNFINISHED)
        )
        q = (
            select(*[c for c in files.c if c.name != "summary"])
            .where(files.c.deleted_at.is_not(None), ~referenced)
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [_file(r, with_summary=False) for r in rows]

    async def expire_files(self, now: int, limit: int = 100) -> int:
        """Mark files past their ``expires_at`` as deleted (their bytes are collected once no
        unfinished batch reads them). Returns how many expired."""
        async with self._write() as conn:
            res = await conn.execute(
                update(files)
                .where(
                    files.c.deleted_at.is_(None),
                    files.c.expires_at.is_not(None),
                    files.c.expires_at <= now,
                )
                .values(deleted_at=now)
            )
            return int(res.rowcount or 0)

    # -- events (webhook outbox) ---------------------------------------------------------------
    async def claim_events(
        self, now: float, lease_seconds: float, limit: int = 50
    ) -> list[BatchEvent]:
        """Events due for delivery, leased by pushing their next attempt past the lease."""
        async with self._write() as conn:
            q = (
                select(events)
                .where(events.c.delivered_at.is_(None), events.c.next_attempt_at <= now)
                .order_by(events.c.id)
                .limit(limit)
                .with_for_update(**self._skip_locked())
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
        async with self._write() as conn:
            await conn.execute(
                update(events).where(events.c.id == event_id).values(delivered_at=at)
            )

    async def event_retry(self, event_id: str, attempts: int, next_at: float | None) -> None:
        """Record a failed delivery; ``next_at`` None gives up on the event."""
        async with self._write() as conn:
            await conn.execute(
                update(events)
                .where(events.c.id == event_id)
                .values(attempts=attempts, next_attempt_at=next_at)
            )

    async def insert_batch(self, rec: BatchRecord) -> None:
        async with self._write() as conn:
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
        async with self._read() as conn:
            row = (await conn.execute(q)).mappings().first()
        return _batch(row) if row else None

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
        async with self._read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [_batch(r) for r in rows]

    async def validating_batches(self, file_id: str | None = None) -> list[BatchRecord]:
        """Batches waiting for their start: ``validating``, or cancelled while validating
        (``cancelling`` with no shard yet: their lines must still be listed as cancelled)."""
        q = select(batches).where(_NOT_STARTED)
        if file_id is not None:
            q = q.where(batches.c.input_file_id == file_id)
        async with self._read() as conn:
            rows = (await conn.execute(q.limit(100))).mappings().all()
        return [_batch(r) for r in rows]

    async def enqueued_tokens(self, model: str) -> int:
        q = select(func.coalesce(func.sum(batches.c.token_estimate), 0)).where(
            batches.c.model == model, batches.c.status.in_(UNFINISHED)
        )
        async with self._read() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def delete_unstarted_batch(self, batch_id: str) -> None:
        """Remove a batch still ``validating`` (one whose create did not finish)."""
        async with self._write() as conn:
            await conn.execute(
                delete(batches).where(batches.c.id == batch_id, batches.c.status == VALIDATING)
            )

    async def fail_started_batch(self, batch_id: str, issue: ValidationIssue, at: int) -> bool:
        """End an unfinished batch ``failed`` for an internal reason (its handling kept
        failing); its shards are no longer claimed. False if it had ended already."""
        async with self._write() as conn:
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
                await _record_event(conn, batch_id, FAILED, at)
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
        async with self._write() as conn:
            checked = bool(token_limit) and model is not None
            if checked:
                assert model is not None
                await self._lock(conn, LOCK_ENQUEUED_TOKENS, model)
            project = None
            if project_token_limit:
                project = (
                    await conn.execute(select(batches.c.project).where(batches.c.id == batch_id))
                ).scalar_one_or_none()
                if project is not None:
                    await self._lock(conn, LOCK_PROJECT_TOKENS, project)
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
                    .where(batches.c.id == batch_id, _NOT_STARTED)
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
        async with self._write() as conn:
            res = await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, _NOT_STARTED)
                .values(status=FAILED, failed_at=at, errors=encode(issues), model=model)
            )
            if res.rowcount:
                await _record_event(conn, batch_id, FAILED, at)
            return bool(res.rowcount)

    async def request_cancel(self, batch_id: str, project: str, at: int) -> BatchRecord | None:
        """Move an unfinished batch to ``cancelling``; return it as it is afterwards."""
        async with self._write() as conn:
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
        return _batch(row) if row else None

    # -- the work queue ------------------------------------------------------------
    async def claim_shards(
        self,
        owner: str,
        n: int,
        now: float,
        lease_seconds: float,
        *,
        paused_models: Sequence[str] = (),
        idle_batches_only: bool = False,
    ) -> list[ShardClaim]:
        """Lease up to ``n`` runnable shards: pending, unleased or with a lapsed lease, of a
        batch that is in progress and not past its deadline.

        One statement for any ``n``: ``UPDATE shards ... WHERE (batch_id, idx) IN (SELECT ...
        FOR UPDATE SKIP LOCKED LIMIT n) RETURNING``, the batch's columns read by correlated
        subqueries in ``RETURNING`` (SQLite allows no joined table there). Each claim bumps
        the shard's token, which fences the writes of whoever held it before. A parked shard
        (``not_before`` in the future) and shards of ``paused_models`` are left alone.

        Fair between batches: each batch's first shard (counting the shards it holds now)
        comes before any batch's second, so a new small batch is claimed next, however many
        shards a big one has waiting. ``idle_batches_only``: only shards of batches that no
        engine runs now (the engine's extra claim beyond ``max_shards``)."""
        runnable = and_(
            shards.c.status == SHARD_PENDING,
            or_(shards.c.lease_until.is_(None), shards.c.lease_until < now),
            or_(shards.c.not_before.is_(None), shards.c.not_before <= now),
            shards.c.batch_id.in_(
                select(batches.c.id).where(
                    batches.c.status == IN_PROGRESS,
                    batches.c.expires_at > now,
                    *([batches.c.model.not_in(list(paused_models))] if paused_models else []),
                )
            ),
        )
        other = shards.alias("other")
        leased = and_(
            other.c.batch_id == shards.c.batch_id,
            other.c.status == SHARD_PENDING,
            other.c.lease_until.is_not(None),
            other.c.lease_until >= now,
        )
        if idle_batches_only:
            runnable = and_(runnable, ~exists().where(leased).correlate(shards))
        # Fair order: every batch's k-th shard before any batch's (k+1)-th, counting the
        # shards it holds already; oldest batch first among equals.
        rank = (
            select(func.count())
            .select_from(other)
            .where(
                other.c.batch_id == shards.c.batch_id,
                other.c.status == SHARD_PENDING,
                or_(
                    and_(other.c.lease_until.is_not(None), other.c.lease_until >= now),
                    other.c.idx < shards.c.idx,
                ),
            )
            .correlate(shards)
            .scalar_subquery()
        )
        pick = (
            select(shards.c.batch_id, shards.c.idx)
            .where(runnable)
            .order_by(rank, shards.c.batch_id, shards.c.idx)
            .limit(n)
            .with_for_update(of=shards, **self._skip_locked())
        )

        def of_batch(col: Any) -> Any:
            return select(col).where(batches.c.id == shards.c.batch_id).scalar_subquery()

        stmt = (
            update(shards)
            .where(tuple_(shards.c.batch_id, shards.c.idx).in_(pick))
            .values(lease_owner=owner, lease_until=now + lease_seconds, token=shards.c.token + 1)
            .returning(
                shards.c.batch_id,
                shards.c.idx,
                shards.c.start_offset,
                shards.c.end_offset,
                shards.c.first_line,
                shards.c.line_count,
                shards.c.token,
                shards.c.done,
                shards.c.part_seq,
                of_batch(batches.c.endpoint).label("endpoint"),
                of_batch(batches.c.input_blob_key).label("input_blob_key"),
                of_batch(batches.c.expires_at).label("expires_at"),
                of_batch(batches.c.project).label("project"),
            )
        )
        async with self._write() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        claims = [
            ShardClaim(
                batch_id=r["batch_id"],
                idx=r["idx"],
                span=ShardSpan(
                    r["start_offset"], r["end_offset"], r["first_line"], r["line_count"]
                ),
                token=r["token"],
                done=bytes(r["done"]),
                part_seq=r["part_seq"],
                endpoint=r["endpoint"],
                input_blob_key=r["input_blob_key"],
                expires_at=r["expires_at"],
                project=r["project"],
            )
            for r in rows
        ]
        claims.sort(key=lambda c: (c.batch_id, c.idx))
        return claims

    async def renew_leases(
        self, owner: str, held: Iterable[tuple[str, int, int]], until: float
    ) -> list[tuple[str, int]]:
        """Extend the leases of ``(batch_id, idx, token)``; return those that were lost.
        One statement however many shards are held."""
        keys = list(held)
        if not keys:
            return []
        stmt = (
            update(shards)
            .where(
                tuple_(shards.c.batch_id, shards.c.idx, shards.c.token).in_(keys),
                shards.c.lease_owner == owner,
                shards.c.status == SHARD_PENDING,
            )
            .values(lease_until=until)
            .returning(shards.c.batch_id, shards.c.idx)
        )
        async with self._write() as conn:
            kept = {(r.batch_id, r.idx) for r in await conn.execute(stmt)}
        return [(b, i) for b, i, _ in keys if (b, i) not in kept]

    async def release_shard(self, claim: ShardClaim, not_before: float) -> bool:
        """Give a held shard back without a checkpoint, not to be claimed before
        ``not_before`` (its run failed). Fenced by the claim's token."""
        async with self._write() as conn:
            res = await conn.execute(
                update(shards)
                .where(_held(claim))
                .values(lease_owner=None, lease_until=None, not_before=not_before)
            )
            return bool(res.rowcount)

    async def checkpoint(
        self,
        claim: ShardClaim,
        *,
        done: bytes,
        part: Part | None,
        usage: Usage,
        shard_done: bool,
        release: bool = False,
    ) -> None:
        """Record one checkpoint of a shard, fenced by the claim's token.

        Adds the part, stores the new done-bitmap, moves the batch's counters. Raises
        :class:`LeaseLost` (and changes nothing) when another worker holds the shard now.
        """
        lost = await self.checkpoint_many(
            [ShardCheckpoint(claim, done, part, usage, shard_done, release)]
        )
        if lost:
            raise LeaseLost(f"shard {claim.batch_id}/{claim.idx} was taken over")

    async def checkpoint_many(
        self, checkpoints: Sequence[ShardCheckpoint]
    ) -> list[tuple[str, int]]:
        """Record the checkpoints of several shards in one transaction; return the shards
        whose lease was lost.

        Each shard is fenced by its own token: for a shard another worker holds now nothing
        is stored (no part, no bitmap, no counters), while the others' checkpoints commit.
        For each shard its part, its done-bitmap and its batch's counters are stored
        together or not at all."""
        lost: list[tuple[str, int]] = []
        if not checkpoints:
            return lost
        async with self._write() as conn:
            added: dict[str, tuple[list[Part], Usage]] = {}
            for ck in checkpoints:
                claim, part = ck.claim, ck.part
                values: dict[str, Any] = {"done": ck.done}
                if part is not None:
                    values["part_seq"] = part.seq
                if ck.shard_done:
                    values.update(status=SHARD_DONE, lease_owner=None, lease_until=None)
                elif ck.release:
                    values.update(lease_owner=None, lease_until=None, not_before=ck.not_before)
                res = await conn.execute(
                    update(shards).where(_held(claim)).values(**values)
                )
                if not res.rowcount:
                    lost.append((claim.batch_id, claim.idx))
                    continue
                if part is None:
                    continue
                batch_parts, usage = added.setdefault(claim.batch_id, ([], Usage()))
                batch_parts.append(part)
                usage.add(ck.usage)
            # batches in one order in every transaction: two of them never wait for each other
            for batch_id in sorted(added):
                await _commit_parts(conn, batch_id, *added[batch_id])
        return lost

    async def signals(self, batch_ids: Iterable[str]) -> dict[str, BatchSignal]:
        ids = list(set(batch_ids))
        if not ids:
            return {}
        q = select(batches.c.id, batches.c.status, batches.c.expires_at).where(
            batches.c.id.in_(ids)
        )
        async with self._read() as conn:
            rows = (await conn.execute(q)).all()
        return {r.id: BatchSignal(r.id, r.status, r.expires_at) for r in rows}

    # -- finalising -------------------------------------------------------------------
    async def claim_finalize(
        self, owner: str, now: float, lease_seconds: float, ids: tuple[str, str]
    ) -> BatchRecord | None:
        """Lease one batch that is ready to finalise: in progress with every shard done,
        cancelling, or past its deadline, and with no shard still leased. ``ids`` are fresh
        output and error file ids, used only if the batch has none yet."""
        live_lease = exists().where(
            shards.c.batch_id == batches.c.id,
            shards.c.status == SHARD_PENDING,
            shards.c.lease_until.is_not(None),
            shards.c.lease_until >= now,
        )
        pending = exists().where(
            shards.c.batch_id == batches.c.id, shards.c.status == SHARD_PENDING
        )
        ready = and_(
            or_(batches.c.final_until.is_(None), batches.c.final_until < now),
            or_(
                and_(batches.c.status.in_((IN_PROGRESS, FINALIZING)), ~pending),
                # a batch cancelled while validating waits for its shards (all cancelled)
                and_(batches.c.status == CANCELLING, ~live_lease, _HAS_SHARDS),
                and_(
                    batches.c.status.in_((IN_PROGRESS, FINALIZING)),
                    batches.c.expires_at <= now,
                    ~live_lease,
                ),
            ),
        )
        q = select(batches.c.id).where(ready).order_by(batches.c.id).limit(1)
        # Most rounds find nothing: look first without taking the write lock.
        async with self._read() as conn:
            if (await conn.execute(q)).scalar() is None:
                return None
        async with self._write() as conn:
            batch_id = (await conn.execute(q.with_for_update(**self._skip_locked()))).scalar()
            if batch_id is None:
                return None
            await conn.execute(
                update(batches)
                .where(batches.c.id == batch_id)
                .values(
                    final_owner=owner,
                    final_until=now + lease_seconds,
                    output_file_id=func.coalesce(batches.c.output_file_id, ids[0]),
                    error_file_id=func.coalesce(batches.c.error_file_id, ids[1]),
                )
            )
            row = (
                (await conn.execute(select(batches).where(batches.c.id == batch_id)))
                .mappings()
                .one()
            )
            return _batch(row)

    async def renew_finalize(self, batch_id: str, owner: str, until: float) -> bool:
        """Extend the finalising lease (the finaliser's heartbeat); False if it was lost."""
        async with self._write() as conn:
            res = await conn.execute(
                update(batches).where(_finalising(batch_id, owner)).values(final_until=until)
            )
            return bool(res.rowcount)

    async def mark_finalizing(self, batch_id: str, owner: str, at: int) -> None:
        async with self._write() as conn:
            await conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch_id,
                    batches.c.final_owner == owner,
                    batches.c.status == IN_PROGRESS,
                )
                .values(status=FINALIZING, finalizing_at=at)
            )

    async def batch_shards(self, batch_id: str) -> list[tuple[int, ShardSpan, bytes]]:
        q = select(shards).where(shards.c.batch_id == batch_id).order_by(shards.c.idx)
        async with self._read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [
            (
                r["idx"],
                ShardSpan(r["start_offset"], r["end_offset"], r["first_line"], r["line_count"]),
                bytes(r["done"]),
            )
            for r in rows
        ]

    async def complete_batch(
        self,
        batch_id: str,
        owner: str,
        *,
        status: str,
        at: int,
        output_file: FileRecord | None,
        error_file: FileRecord | None,
        completed: int,
        failed: int,
    ) -> bool:
        """The last step of finalising: create the result files' records and end the batch.
        False (and nothing changed) if the lease was lost or the batch already ended."""
        if status not in TERMINAL:
            raise ValueError(status)
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}
        async with self._write() as conn:
            res = await conn.execute(
                update(batches)
                .where(_finalising(batch_id, owner))
                .values(
                    status=status,
                    output_file_id=output_file.id if output_file else None,
                    error_file_id=error_file.id if error_file else None,
                    completed=completed,
                    failed=failed,
                    final_owner=None,
                    final_until=None,
                    **{stamp[status]: at},
                )
            )
            if not res.rowcount:
                return False
            for rec in (output_file, error_file):
                if rec is not None:
                    await conn.execute(insert(files).values(**_file_values(rec)))
            await _record_event(conn, batch_id, status, at)
            return True

    # -- results: parts and their positions (see batchd.results) --------------------------
    async def result_parts(self, batch_id: str, after_pos: int = -1) -> list[Part]:
        """The committed parts of a batch holding a position after ``after_pos``, by
        ``first_pos`` (the order their results were committed)."""
        q = (
            select(parts)
            .where(
                parts.c.batch_id == batch_id,
                parts.c.first_pos + parts.c.out_lines + parts.c.err_lines > after_pos + 1,
            )
            .order_by(parts.c.first_pos)
        )
        async with self._read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [_part(r) for r in rows]

    async def commit_last_part(self, part: Part, owner: str) -> bool:
        """Add a finalising batch's last part (its never-executed requests), with positions
        after every executed result, fenced by the finalising lease of ``owner``. Idempotent:
        True when the part is stored (now or by an earlier attempt), False when the lease was
        lost."""
        async with self._write() as conn:
            held = await conn.execute(
                update(batches)
                .where(_finalising(part.batch_id, owner))
                .values(final_owner=owner)
            )
            if not held.rowcount:
                return False
            stored = exists().where(
                parts.c.batch_id == part.batch_id,
                parts.c.shard_idx == part.shard_idx,
                parts.c.seq == part.seq,
            )
            if not (await conn.execute(select(stored))).scalar_one():
                await _commit_parts(conn, part.batch_id, [part], Usage())
            return True

    async def batches_with_results_gone(self, limit: int = 100) -> list[str]:
        """Ended batches that still have parts while none of their result files is left
        (expired or deleted: no such file, or marked deleted): their parts can go."""
        def gone(file_id: Any) -> Any:
            live = exists().where(files.c.id == file_id, files.c.deleted_at.is_(None))
            return or_(file_id.is_(None), ~live)

        has_parts = exists().where(parts.c.batch_id == batches.c.id)
        q = (
            select(batches.c.id)
            .where(
                batches.c.status.in_(TERMINAL),
                has_parts,
                gone(batches.c.output_file_id),
                gone(batches.c.error_file_id),
            )
            .limit(limit)
        )
        async with self._read() as conn:
            return list((await conn.execute(q)).scalars())

    async def delete_result_parts(self, batch_id: str) -> None:
        """Forget a batch's parts (their blobs are deleted first, by the caller)."""
        async with self._write() as conn:
            await conn.execute(delete(parts).where(parts.c.batch_id == batch_id))

    # -- cluster-wide deployment limits (see store/slots.py) --------------------------------
    async def lease_slots(
        self,
        owner: str,
        demands: dict[str, SlotDemand],
        now: float,
        until: float,
        weight: Callable[[str], float] = lambda _: 1.0,
    ) -> dict[str, SlotGrant]:
        """Renew this process's shares of the deployments' slots; one transaction.
        ``weight(project)``: the projects' relative shares."""
        async with self._write() as conn:
            return await slots.lease(conn, owner, demands, now, until, weight)

    async def queue_state(self, now: float) -> state.QueueState:
        """Batches by status, shards waiting and leased, slot leases (see store/state.py)."""
        async with self._read() as conn:
            return await state.read(conn, now)

    async def live_engines(self, now: float) -> int:
        """Engine processes alive now: each renews its slot leases every second or so
        (``deployment_slots``), so a process with an unexpired lease is running."""
        t = deployment_slots
        q = select(func.count(func.distinct(t.c.owner))).where(t.c.until >= now)
        async with self._read() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def release_slots(self, owner: str) -> None:
        async with self._write() as conn:
            await slots.release(conn, owner)
