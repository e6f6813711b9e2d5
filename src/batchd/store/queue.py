"""The work queue in the SQL store (:class:`batchd.store.protocols.QueueStore`): shards
leased to engines and renewed by their heartbeat, checkpoints fenced by the lease token, the
parts they store with their result positions, and the finalising lease that ends a batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, delete, exists, func, insert, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.errors import LeaseLost
from batchd.models import (
    CANCELLING,
    FINALIZING,
    IN_PROGRESS,
    SHARD_DONE,
    SHARD_PENDING,
    TERMINAL,
    BatchRecord,
    FileRecord,
    Part,
    ShardClaim,
    ShardSpan,
    Usage,
)
from batchd.store import state
from batchd.store.db import Database
from batchd.store.protocols import ShardCheckpoint
from batchd.store.rows import HAS_SHARDS, batch_record, file_values, part_record, record_event
from batchd.store.schema import batches, files, parts, shards
from batchd.store.types import QueueState


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


class SqlQueueStore:
    def __init__(self, db: Database) -> None:
        self._db = db

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
            .with_for_update(of=shards, **self._db.skip_locked())
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
        async with self._db.write() as conn:
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
        async with self._db.write() as conn:
            kept = {(r.batch_id, r.idx) for r in await conn.execute(stmt)}
        return [(b, i) for b, i, _ in keys if (b, i) not in kept]

    async def release_shard(self, claim: ShardClaim, not_before: float) -> bool:
        """Give a held shard back without a checkpoint, not to be claimed before
        ``not_before`` (its run failed). Fenced by the claim's token."""
        async with self._db.write() as conn:
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
        async with self._db.write() as conn:
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
                and_(batches.c.status == CANCELLING, ~live_lease, HAS_SHARDS),
                and_(
                    batches.c.status.in_((IN_PROGRESS, FINALIZING)),
                    batches.c.expires_at <= now,
                    ~live_lease,
                ),
            ),
        )
        q = select(batches.c.id).where(ready).order_by(batches.c.id).limit(1)
        # Most rounds find nothing: look first without taking the write lock.
        async with self._db.read() as conn:
            if (await conn.execute(q)).scalar() is None:
                return None
        async with self._db.write() as conn:
            batch_id = (await conn.execute(q.with_for_update(**self._db.skip_locked()))).scalar()
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
            return batch_record(row)

    async def renew_finalize(self, batch_id: str, owner: str, until: float) -> bool:
        """Extend the finalising lease (the finaliser's heartbeat); False if it was lost."""
        async with self._db.write() as conn:
            res = await conn.execute(
                update(batches).where(_finalising(batch_id, owner)).values(final_until=until)
            )
            return bool(res.rowcount)

    async def mark_finalizing(self, batch_id: str, owner: str, at: int) -> None:
        async with self._db.write() as conn:
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
        async with self._db.read() as conn:
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
        async with self._db.write() as conn:
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
                    await conn.execute(insert(files).values(**file_values(rec)))
            await record_event(conn, batch_id, status, at)
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
        async with self._db.read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [part_record(r) for r in rows]

    async def commit_last_part(self, part: Part, owner: str) -> bool:
        """Add a finalising batch's last part (its never-executed requests), with positions
        after every executed result, fenced by the finalising lease of ``owner``. Idempotent:
        True when the part is stored (now or by an earlier attempt), False when the lease was
        lost."""
        async with self._db.write() as conn:
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
        async with self._db.read() as conn:
            return list((await conn.execute(q)).scalars())

    async def delete_result_parts(self, batch_id: str) -> None:
        """Forget a batch's parts (their blobs are deleted first, by the caller)."""
        async with self._db.write() as conn:
            await conn.execute(delete(parts).where(parts.c.batch_id == batch_id))

    async def queue_state(self, now: float) -> QueueState:
        """Batches by status, shards waiting and leased, slot leases (see store/state.py)."""
        async with self._db.read() as conn:
            return await state.read(conn, now)
