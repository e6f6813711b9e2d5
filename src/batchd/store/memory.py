"""The whole store in memory, for unit tests of the engine, the finaliser and the services.

One :class:`~batchd.store.memory_state.MemoryState` holds every aggregate's rows (idempotency
keys, leases and message batches are kept by :mod:`batchd.store.memory_keyed` and
:mod:`batchd.store.memory_message_batches`); :func:`memory_store` builds a
:class:`~batchd.store.protocols.Store` over it, and two stores over one state stand for two
replicas on one database. It keeps the SQL store's contract (the same contract suite runs on
it): claims in the same fair order, checkpoints fenced by the lease token, limits checked
and taken atomically. A method never awaits while it reads or changes the state, so each
call is one transaction on the event loop; one that fails changes nothing. What the database
refuses (a duplicate id, an offset past a 64-bit column) raises
:class:`~batchd.errors.StoreError` as it does there. Records go in and out as copies.

Nothing is persisted, and the state belongs to one event loop: not for production.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from batchd.errors import LeaseLost, QuotaExceeded, StoreError
from batchd.models import (
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
)
from batchd.store.memory_keyed import MemoryIdempotencyKeys, MemoryLeases
from batchd.store.memory_message_batches import MemoryMessageBatches
from batchd.store.memory_state import BatchRow, MemoryState, ShardRow, SlotRow
from batchd.store.protocols import IdempotencyKeyStore, ShardCheckpoint, Store
from batchd.store.types import (
    UNFINISHED,
    QueueState,
    SlotDemand,
    SlotGrant,
    SlotUse,
    TokenUsage,
    even,
    grants_for,
    slot_leases,
)

_INT64 = 2**63


def _listed(rec: FileRecord) -> FileRecord:
    return replace(copy.deepcopy(rec), summary=None)


class MemoryFileStore:
    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def _live(self, project: str | None) -> list[FileRecord]:
        return [
            f.rec
            for f in self._s.files.values()
            if f.deleted_at is None and (project is None or f.rec.project == project)
        ]

    async def insert_file(self, rec: FileRecord, *, max_files: int | None = None) -> None:
        if max_files is not None:
            used = len(self._live(rec.project))
            if used >= max_files:
                raise QuotaExceeded(f"{used} files of {max_files}", used=used)
        self._s.add_file(rec)

    async def get_file(self, file_id: str, project: str | None = None) -> FileRecord | None:
        f = self._s.files.get(file_id)
        if f is None or f.deleted_at is not None or project not in (None, f.rec.project):
            return None
        return copy.deepcopy(f.rec)

    async def list_files(
        self,
        project: str | None,
        *,
        purpose: str | None,
        limit: int,
        after: str | None,
        order: str,
    ) -> list[FileRecord]:
        asc = order == "asc"
        rows = [
            r
            for r in self._live(project)
            if (not purpose or r.purpose == purpose)
            and (not after or (r.id > after if asc else r.id < after))
        ]
        rows.sort(key=lambda r: r.id, reverse=not asc)
        return [_listed(r) for r in rows[: limit + 1]]

    async def count_files(self, project: str) -> int:
        return len(self._live(project))

    async def mark_file_deleted(self, file_id: str, project: str, at: int) -> FileRecord | None:
        f = self._s.files.get(file_id)
        if f is None or f.deleted_at is not None or f.rec.project != project:
            return None
        f.deleted_at = at
        return _listed(f.rec)

    async def blob_in_use(self, blob_key: str) -> bool:
        return self._s.in_use(blob_key)

    async def purge_file(self, file_id: str) -> None:
        self._s.files.pop(file_id, None)

    async def deleted_files_unreferenced(self, limit: int = 100) -> list[FileRecord]:
        gone = sorted(
            (f.rec for f in self._s.files.values() if f.deleted_at is not None),
            key=lambda r: r.id,
        )
        return [_listed(r) for r in gone if not self._s.in_use(r.blob_key)][:limit]

    async def expire_files(self, now: int, limit: int = 100) -> int:
        # Like the SQL store, every file past its time in one go (``limit`` is not applied).
        expired = [
            f
            for f in self._s.files.values()
            if f.deleted_at is None and f.rec.expires_at is not None and f.rec.expires_at <= now
        ]
        for f in expired:
            f.deleted_at = now
        return len(expired)


class MemoryBatchStore:
    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def _get(self, batch_id: str, project: str | None = None) -> BatchRow | None:
        b = self._s.batches.get(batch_id)
        return b if b is not None and project in (None, b.rec.project) else None

    async def insert_batch(self, rec: BatchRecord) -> None:
        if rec.id in self._s.batches:
            raise StoreError(f"metadata store write failed: duplicate batch id {rec.id}")
        kept = BatchRecord(
            id=rec.id,
            project=rec.project,
            endpoint=rec.endpoint,
            input_file_id=rec.input_file_id,
            completion_window=rec.completion_window,
            status=rec.status,
            created_at=rec.created_at,
            expires_at=rec.expires_at,
            input_blob_key=rec.input_blob_key,
            model=rec.model,
            metadata=copy.deepcopy(rec.metadata),
            output_expires_after=rec.output_expires_after,
            token_estimate=rec.token_estimate,
            api=rec.api,
            endpoint_as_sent=rec.endpoint_as_sent,
        )
        self._s.batches[rec.id] = BatchRow(kept)

    async def get_batch(self, batch_id: str, project: str | None = None) -> BatchRecord | None:
        b = self._get(batch_id, project)
        return None if b is None else copy.deepcopy(b.rec)

    async def list_batches(
        self, project: str | None, *, limit: int, after: str | None, status: str | None = None
    ) -> list[BatchRecord]:
        rows = [
            b.rec
            for b in self._s.batches.values()
            if project in (None, b.rec.project)
            and status in (None, b.rec.status)
            and (not after or b.rec.id < after)
        ]
        rows.sort(key=lambda r: r.id, reverse=True)
        return copy.deepcopy(rows[: limit + 1])

    async def validating_batches(self, file_id: str | None = None) -> list[BatchRecord]:
        rows = [
            b.rec
            for b in self._s.batches.values()
            if self._s.not_started(b) and file_id in (None, b.rec.input_file_id)
        ]
        return copy.deepcopy(sorted(rows, key=lambda r: r.id)[:100])

    def _enqueued(self, same: Callable[[BatchRecord], bool], but: str = "") -> int:
        return sum(
            b.rec.token_estimate
            for b in self._s.batches.values()
            if same(b.rec) and b.rec.status in UNFINISHED and b.rec.id != but
        )

    async def enqueued_tokens(self, model: str) -> int:
        return self._enqueued(lambda r: r.model == model)

    async def delete_unstarted_batch(self, batch_id: str) -> None:
        b = self._get(batch_id)
        if b is not None and b.rec.status == VALIDATING:
            self._s.drop_batch(batch_id)

    async def fail_started_batch(self, batch_id: str, issue: ValidationIssue, at: int) -> bool:
        b = self._get(batch_id)
        if b is None or b.rec.status not in UNFINISHED:
            return False
        b.rec.status, b.rec.failed_at, b.rec.errors = FAILED, at, [issue]
        b.final_owner = b.final_until = None
        b.rec.output_file_id = b.rec.error_file_id = None
        self._s.record_event(batch_id, FAILED, at)
        return True

    def _take_quota(self, b: BatchRecord, tokens: int, limit: int, scope: str) -> None:
        if scope == "deployment":
            used = self._enqueued(lambda r: r.model == b.model, but=b.id)
        else:
            used = self._enqueued(lambda r: r.project == b.project, but=b.id)
        if used + tokens > limit:
            raise QuotaExceeded(f"{used} tokens of {limit}", used=used, scope=scope)

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
        b = self._get(batch_id)
        if b is None or not self._s.not_started(b):
            return False
        if any(
            not -_INT64 <= v < _INT64
            for s in spans
            for v in (s.start, s.end, s.first_line, s.count)
        ):
            raise StoreError("metadata store write failed: a shard offset past 64 bits")
        total = sum(s.count for s in spans)
        if b.rec.status == VALIDATING:
            moved = replace(b.rec, model=model)  # the quotas count this batch under ``model``
            if token_limit and model is not None:
                self._take_quota(moved, token_estimate, token_limit, "deployment")
            if project_token_limit:
                self._take_quota(moved, token_estimate, project_token_limit, "project")
            b.rec.status, b.rec.in_progress_at = IN_PROGRESS, at
            b.rec.token_estimate = token_estimate
        b.rec.model, b.rec.total = model, total
        self._s.shards[batch_id] = {
            i: ShardRow(span=s, done=bytes((s.count + 7) // 8)) for i, s in enumerate(spans)
        }
        return True

    async def fail_batch(
        self, batch_id: str, issues: list[ValidationIssue], at: int, *, model: str | None = None
    ) -> bool:
        b = self._get(batch_id)
        if b is None or not self._s.not_started(b):
            return False
        b.rec.status, b.rec.failed_at = FAILED, at
        b.rec.errors, b.rec.model = copy.deepcopy(issues), model
        self._s.record_event(batch_id, FAILED, at)
        return True

    async def request_cancel(self, batch_id: str, project: str, at: int) -> BatchRecord | None:
        b = self._get(batch_id, project)
        if b is None:
            return None
        if b.rec.status in (VALIDATING, IN_PROGRESS):
            b.rec.status, b.rec.cancelling_at = CANCELLING, at
        return copy.deepcopy(b.rec)

    async def signals(self, batch_ids: Iterable[str]) -> dict[str, BatchSignal]:
        found = (self._s.batches.get(i) for i in set(batch_ids))
        return {
            b.rec.id: BatchSignal(b.rec.id, b.rec.status, b.rec.expires_at) for b in found if b
        }


class MemoryQueueStore:
    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def _held(self, claim: ShardClaim) -> ShardRow | None:
        """The claimed shard, while the claim's token still holds it (the fence)."""
        sh = self._s.shards.get(claim.batch_id, {}).get(claim.idx)
        if sh is None or sh.token != claim.token or sh.status != SHARD_PENDING:
            return None
        return sh

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
        candidates: list[tuple[int, str, int]] = []
        for batch_id, shards in self._s.shards.items():
            rec = self._s.batches[batch_id].rec
            if rec.status != IN_PROGRESS or rec.expires_at <= now:
                continue
            if paused_models and (rec.model is None or rec.model in paused_models):
                continue  # SQL's NOT IN: a batch with no model is not claimed either
            pending = {i: sh for i, sh in shards.items() if sh.status == SHARD_PENDING}
            if idle_batches_only and any(sh.leased(now) for sh in pending.values()):
                continue
            for i, sh in pending.items():
                if sh.lease_until is not None and sh.lease_until >= now:
                    continue
                if sh.not_before is not None and sh.not_before > now:
                    continue
                # Fair order: the shards of the batch held now or before this one.
                rank = sum(1 for j, o in pending.items() if o.leased(now) or j < i)
                candidates.append((rank, batch_id, i))
        claims = []
        for _, batch_id, i in sorted(candidates)[: max(n, 0)]:
            sh = self._s.shards[batch_id][i]
            sh.lease_owner, sh.lease_until, sh.token = owner, now + lease_seconds, sh.token + 1
            rec = self._s.batches[batch_id].rec
            claims.append(
                ShardClaim(
                    batch_id=batch_id,
                    idx=i,
                    span=sh.span,
                    token=sh.token,
                    done=sh.done,
                    part_seq=sh.part_seq,
                    endpoint=rec.endpoint,
                    input_blob_key=rec.input_blob_key,
                    expires_at=rec.expires_at,
                    project=rec.project,
                )
            )
        claims.sort(key=lambda c: (c.batch_id, c.idx))
        return claims

    async def renew_leases(
        self, owner: str, held: Iterable[tuple[str, int, int]], until: float
    ) -> list[tuple[str, int]]:
        keys = list(held)
        kept = set()
        for b, i, token in keys:
            sh = self._s.shards.get(b, {}).get(i)
            if (
                sh is not None
                and sh.token == token
                and sh.lease_owner == owner
                and sh.status == SHARD_PENDING
            ):
                sh.lease_until = until
                kept.add((b, i))
        return [(b, i) for b, i, _ in keys if (b, i) not in kept]

    async def release_shard(self, claim: ShardClaim, not_before: float) -> bool:
        sh = self._held(claim)
        if sh is None:
            return False
        sh.lease_owner, sh.lease_until, sh.not_before = None, None, not_before
        return True

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
        lost = await self.checkpoint_many(
            [ShardCheckpoint(claim, done, part, usage, shard_done, release)]
        )
        if lost:
            raise LeaseLost(f"shard {claim.batch_id}/{claim.idx} was taken over")

    async def checkpoint_many(
        self, checkpoints: Sequence[ShardCheckpoint]
    ) -> list[tuple[str, int]]:
        lost: list[tuple[str, int]] = []
        with self._s.transaction():
            for ck in checkpoints:
                sh = self._held(ck.claim)
                if sh is None:
                    lost.append((ck.claim.batch_id, ck.claim.idx))
                    continue
                sh.done = bytes(ck.done)
                if ck.shard_done:
                    sh.status, sh.lease_owner, sh.lease_until = SHARD_DONE, None, None
                elif ck.release:
                    sh.lease_owner, sh.lease_until = None, None
                    sh.not_before = ck.not_before
                part = ck.part
                if part is None:
                    continue
                sh.part_seq = part.seq
                self._s.add_part(part, ck.usage)
        return lost

    def _ready(self, b: BatchRow, now: float) -> bool:
        """Ready to finalise (the SQL store's ``claim_finalize`` condition)."""
        if b.final_until is not None and b.final_until >= now:
            return False
        shards = self._s.shards.get(b.rec.id, {}).values()
        pending = [sh for sh in shards if sh.status == SHARD_PENDING]
        live = any(sh.leased(now) for sh in pending)
        running = b.rec.status in (IN_PROGRESS, FINALIZING)
        return (
            (running and not pending)
            or (b.rec.status == CANCELLING and not live and bool(shards))
            or (running and b.rec.expires_at <= now and not live)
        )

    def _finalising(self, batch_id: str, owner: str) -> BatchRow | None:
        b = self._s.batches.get(batch_id)
        if b is None or b.final_owner != owner or b.rec.status in TERMINAL:
            return None
        return b

    async def claim_finalize(
        self, owner: str, now: float, lease_seconds: float, ids: tuple[str, str]
    ) -> BatchRecord | None:
        ready = sorted(i for i, b in self._s.batches.items() if self._ready(b, now))
        if not ready:
            return None
        b = self._s.batches[ready[0]]
        b.final_owner, b.final_until = owner, now + lease_seconds
        b.rec.output_file_id = b.rec.output_file_id or ids[0]
        b.rec.error_file_id = b.rec.error_file_id or ids[1]
        return copy.deepcopy(b.rec)

    async def renew_finalize(self, batch_id: str, owner: str, until: float) -> bool:
        b = self._finalising(batch_id, owner)
        if b is not None:
            b.final_until = until
        return b is not None

    async def mark_finalizing(self, batch_id: str, owner: str, at: int) -> None:
        b = self._s.batches.get(batch_id)
        if b is not None and b.final_owner == owner and b.rec.status == IN_PROGRESS:
            b.rec.status, b.rec.finalizing_at = FINALIZING, at

    async def batch_shards(self, batch_id: str) -> list[tuple[int, ShardSpan, bytes]]:
        shards = self._s.shards.get(batch_id, {})
        return [(i, shards[i].span, shards[i].done) for i in sorted(shards)]

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
        if status not in TERMINAL:
            raise ValueError(status)
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}
        b = self._finalising(batch_id, owner)
        if b is None:
            return False
        with self._s.transaction():
            for rec in (output_file, error_file):
                if rec is not None:
                    self._s.add_file(rec)
            b.rec.status, b.rec.completed, b.rec.failed = status, completed, failed
            b.rec.output_file_id = output_file.id if output_file else None
            b.rec.error_file_id = error_file.id if error_file else None
            b.final_owner = b.final_until = None
            setattr(b.rec, stamp[status], at)  # KeyError for "failed", as in the SQL store
            self._s.record_event(batch_id, status, at)
        return True

    def _of(self, batch_id: str) -> list[Part]:
        return sorted(
            (p for k, p in self._s.parts.items() if k[0] == batch_id), key=lambda p: p.first_pos
        )

    async def result_parts(self, batch_id: str, after_pos: int = -1) -> list[Part]:
        return [p for p in self._of(batch_id) if p.first_pos + p.lines > after_pos + 1]

    async def commit_last_part(self, part: Part, owner: str) -> bool:
        if self._finalising(part.batch_id, owner) is None:
            return False
        if (part.batch_id, part.shard_idx, part.seq) not in self._s.parts:
            self._s.add_part(part, Usage())
        return True

    async def batches_with_results_gone(self, limit: int = 100) -> list[str]:
        def gone(file_id: str | None) -> bool:
            f = self._s.files.get(file_id) if file_id is not None else None
            return f is None or f.deleted_at is not None

        with_parts = {k[0] for k in self._s.parts}
        return sorted(
            i
            for i in with_parts
            if (b := self._s.batches[i]).rec.status in TERMINAL
            and gone(b.rec.output_file_id)
            and gone(b.rec.error_file_id)
        )[:limit]

    async def delete_result_parts(self, batch_id: str) -> None:
        self._s.drop_parts(batch_id)

    async def queue_state(self, now: float) -> QueueState:
        by_status: dict[str, int] = {}
        for b in self._s.batches.values():
            by_status[b.rec.status] = by_status.get(b.rec.status, 0) + 1
        waiting = leased = 0
        for batch_id, shards in self._s.shards.items():
            if self._s.batches[batch_id].rec.status != IN_PROGRESS:
                continue
            for sh in shards.values():
                if sh.status == SHARD_PENDING:
                    leased += sh.leased(now)
                    waiting += not sh.leased(now)
        left = sum(
            b.rec.total - b.rec.completed - b.rec.failed
            for b in self._s.batches.values()
            if b.rec.status in (IN_PROGRESS, FINALIZING, CANCELLING)
        )
        uses: dict[str, SlotUse] = {}
        wants: dict[str, dict[str, int]] = {}
        for (d, _), row in self._s.slots.items():
            if row.until < now:
                continue
            u = uses.get(d, SlotUse(0, 0, 0))
            uses[d] = SlotUse(u.processes + 1, u.want + row.want, u.slots + row.slots)
            for project, want in row.projects.items():
                wants.setdefault(d, {})[project] = wants.get(d, {}).get(project, 0) + want
        return QueueState(by_status, waiting, leased, left, uses, wants)


class MemoryOutboxStore:
    def __init__(self, state: MemoryState) -> None:
        self._s = state

    async def claim_events(
        self, now: float, lease_seconds: float, limit: int = 50
    ) -> list[BatchEvent]:
        due = sorted(
            (
                e
                for e in self._s.events.values()
                if e.delivered_at is None
                and e.next_attempt_at is not None
                and e.next_attempt_at <= now
            ),
            key=lambda e: e.event.id,
        )[:limit]
        for e in due:
            e.next_attempt_at = now + lease_seconds
        return [e.event for e in due]

    async def event_done(self, event_id: str, at: int) -> None:
        if event_id in self._s.events:
            self._s.events[event_id].delivered_at = at

    async def event_retry(self, event_id: str, attempts: int, next_at: float | None) -> None:
        e = self._s.events.get(event_id)
        if e is not None:
            e.event = replace(e.event, attempts=attempts)
            e.next_attempt_at = next_at


class MemoryUsageStore:
    def __init__(self, state: MemoryState) -> None:
        self._s = state

    async def token_usage(self, project: str | None = None) -> list[TokenUsage]:
        rows: dict[tuple[str, str], TokenUsage] = {}
        for b in self._s.batches.values():
            r = b.rec
            if project not in (None, r.project):
                continue
            key = (r.project, r.model or "")
            u = rows.get(key, TokenUsage(r.project, r.model or "", 0, 0, 0, 0))
            live = r.status in UNFINISHED
            rows[key] = TokenUsage(
                u.project,
                u.model,
                u.enqueued + (r.token_estimate if live else 0),
                u.input_tokens + r.usage.input_tokens,
                u.output_tokens + r.usage.output_tokens,
                u.unfinished + live,
            )
        return [rows[k] for k in sorted(rows)]


class MemorySlotStore:
    def __init__(self, state: MemoryState) -> None:
        self._s = state

    async def lease_slots(
        self,
        owner: str,
        demands: dict[str, SlotDemand],
        now: float,
        until: float,
        weight: Callable[[str], float] = even,
    ) -> dict[str, SlotGrant]:
        rows = self._s.slots
        for key in [k for k, r in rows.items() if r.until < now or k[1] == owner]:
            del rows[key]
        held = [(d, o, r.want, r.slots, r.projects) for (d, o), r in rows.items()]
        grants = grants_for(owner, demands, held, weight)
        for row in slot_leases(demands, grants):
            rows[(row.deployment, owner)] = SlotRow(row.want, row.slots, until, row.projects)
        return grants

    async def live_engines(self, now: float) -> int:
        return len({o for (_, o), r in self._s.slots.items() if r.until >= now})

    async def release_slots(self, owner: str) -> None:
        for key in [k for k in self._s.slots if k[1] == owner]:
            del self._s.slots[key]


class _Connection:
    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def memory_store(state: MemoryState | None = None) -> Store:
    """A store in memory; pass one ``state`` to several to have replicas of one database."""
    s = state if state is not None else MemoryState()

    def keys(ttl: int, stale: int) -> IdempotencyKeyStore:
        return MemoryIdempotencyKeys(s, ttl=ttl, stale=stale)

    return Store(
        files=MemoryFileStore(s),
        batches=MemoryBatchStore(s),
        queue=MemoryQueueStore(s),
        outbox=MemoryOutboxStore(s),
        usage=MemoryUsageStore(s),
        slots=MemorySlotStore(s),
        leases=MemoryLeases(s),
        message_batches=MemoryMessageBatches(s),
        idempotency_keys=keys,
        connection=_Connection(),
    )
