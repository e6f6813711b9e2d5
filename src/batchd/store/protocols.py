"""What the services and the engine need of the store: one small contract per aggregate.

Aggregates and their implementations (SQL on SQLAlchemy Core over one
:class:`~batchd.store.db.Database`; in memory in :mod:`batchd.store.memory`):

- :class:`FileStore` files (:mod:`batchd.store.files`)
- :class:`BatchStore` batches and their lifecycle up to running (:mod:`batchd.store.batches`)
- :class:`QueueStore` the work queue: shards, claims and their leases, checkpoints, parts,
  finalising leases (:mod:`batchd.store.queue`)
- :class:`OutboxStore` batch events for webhooks (:mod:`batchd.store.outbox`)
- :class:`UsageStore` token usage per project and deployment (:mod:`batchd.store.usage`)
- :class:`SlotStore` cluster-wide deployment slots (:mod:`batchd.store.slots`)
- :class:`IdempotencyKeyStore`, :class:`LeaseStore` (:mod:`batchd.store.keyed`)
- :class:`MessageBatchRecords` Anthropic's message batches (:mod:`batchd.store.message_batches`)

:class:`Store` puts one implementation of each together; :func:`batchd.store.open_store`
builds the SQL one, :func:`batchd.store.memory.memory_store` the in-memory one. Every method
is atomic with respect to every other call on the same store (across replicas, for SQL): one
transaction, except :meth:`LeaseStore.acquire`, which on SQL takes a name never held before
in a second transaction (an update, then an insert that a racing replica's insert makes fail:
still one holder). Failures of the backing database raise :class:`batchd.errors.StoreError`.

The records these contracts pass besides the domain's (:mod:`batchd.models`) are in
:mod:`batchd.store.types`; neither module loads SQLAlchemy.

The contract suite (tests/integration/test_store_contract.py and its neighbours) runs on every
implementation, so that none drifts from the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from batchd.models import (
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
from batchd.store.types import (
    KeyState,
    MessageBatchRow,
    QueueState,
    SlotDemand,
    SlotGrant,
    TokenUsage,
    even,
)


@dataclass(frozen=True, slots=True)
class ShardCheckpoint:
    """What one checkpoint stores for a shard (see :meth:`QueueStore.checkpoint_many`)."""

    claim: ShardClaim
    done: bytes  # the done-bitmap matching every result stored so far, ``part`` included
    part: Part | None  # the results since the last checkpoint, if any
    usage: Usage  # their usage, added to the batch's counters
    shard_done: bool  # every line has a result: the shard ends
    release: bool = False  # the holder stops: the lease ends
    not_before: float | None = None  # with ``release``: not claimed again before (parked)


class FileStore(Protocol):
    """File records (uploads and result files). Deleting marks; bytes are purged later."""

    async def insert_file(self, rec: FileRecord, *, max_files: int | None = None) -> None:
        """Record a file. With ``max_files``, only while its project has fewer files (not
        deleted, result files included), counted and taken atomically. Raises
        :class:`batchd.errors.QuotaExceeded` (nothing recorded) at the limit."""
        ...

    async def get_file(self, file_id: str, project: str | None = None) -> FileRecord | None:
        """The file (with its summary), unless deleted or of another ``project``."""
        ...

    async def list_files(
        self,
        project: str | None,
        *,
        purpose: str | None,
        limit: int,
        after: str | None,
        order: str,
    ) -> list[FileRecord]:
        """Up to ``limit + 1`` files by id (``order`` "asc" or "desc"), after the id
        ``after``, without their summaries; of every project when ``project`` is None."""
        ...

    async def count_files(self, project: str) -> int: ...

    async def mark_file_deleted(self, file_id: str, project: str, at: int) -> FileRecord | None:
        """Mark the file deleted at ``at``; the record (no summary), None if not there."""
        ...

    async def blob_in_use(self, blob_key: str) -> bool:
        """Whether an unfinished batch still reads this input blob."""
        ...

    async def purge_file(self, file_id: str) -> None:
        """Forget the record (its bytes are gone)."""
        ...

    async def deleted_files_unreferenced(self, limit: int = 100) -> list[FileRecord]:
        """Up to ``limit`` deleted files whose blob no unfinished batch reads, by id (no
        summaries)."""
        ...

    async def expire_files(self, now: int, limit: int = 100) -> int:
        """Mark files past their ``expires_at`` as deleted; how many."""
        ...


class BatchStore(Protocol):
    """Batch records, from create to running, and their ends other than finalising."""

    async def insert_batch(self, rec: BatchRecord) -> None:
        """Record a new batch: its parameters; counters zero, no timestamps beyond
        ``created_at``/``expires_at``."""
        ...

    async def get_batch(self, batch_id: str, project: str | None = None) -> BatchRecord | None:
        ...

    async def list_batches(
        self, project: str | None, *, limit: int, after: str | None, status: str | None = None
    ) -> list[BatchRecord]:
        """Newest first (by id, below ``after``), up to ``limit + 1``; of every project when
        ``project`` is None, of one status when ``status`` is given."""
        ...

    async def validating_batches(self, file_id: str | None = None) -> list[BatchRecord]:
        """Up to 100 batches waiting for their start: ``validating``, or cancelled while
        validating (``cancelling`` with no shard yet)."""
        ...

    async def enqueued_tokens(self, model: str) -> int:
        """The token estimates of the model's unfinished batches, summed."""
        ...

    async def delete_unstarted_batch(self, batch_id: str) -> None:
        """Remove a batch still ``validating`` (one whose create did not finish)."""
        ...

    async def fail_started_batch(self, batch_id: str, issue: ValidationIssue, at: int) -> bool:
        """End an unfinished batch ``failed`` for an internal reason; its shards are no longer
        claimed, a ``batch.failed`` event is recorded. False if it had ended already."""
        ...

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
        validating gets its shards too but stays ``cancelling``. False if it is started or
        ended already. With ``token_limit`` the model's enqueued tokens, with
        ``project_token_limit`` the project's, this batch's included, must stay within the
        limit, checked and taken atomically: raises :class:`batchd.errors.QuotaExceeded`
        (nothing changed; ``scope`` "deployment" or "project") if not."""
        ...

    async def fail_batch(
        self, batch_id: str, issues: list[ValidationIssue], at: int, *, model: str | None = None
    ) -> bool:
        """End a batch not started yet ``failed`` with ``issues`` (and a ``batch.failed``
        event); False if it had started or ended."""
        ...

    async def request_cancel(self, batch_id: str, project: str, at: int) -> BatchRecord | None:
        """Move a validating or running batch to ``cancelling``; the batch as it is
        afterwards (None if not the project's)."""
        ...

    async def signals(self, batch_ids: Iterable[str]) -> dict[str, BatchSignal]:
        """Status and deadline of each batch that exists, by id."""
        ...


class QueueStore(Protocol):
    """The work queue: shards leased to engines, fenced checkpoints, finalising leases."""

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
        """Lease up to ``n`` runnable shards (pending, unleased or lease lapsed, not parked
        past ``now``, of a batch in progress before its deadline and not of
        ``paused_models``), sorted by (batch, idx). Each claim bumps the shard's token.
        Fair: every batch's k-th shard, counting those it holds, before any batch's
        (k+1)-th, oldest batch first among equals. ``idle_batches_only``: only batches with
        no live lease."""
        ...

    async def renew_leases(
        self, owner: str, held: Iterable[tuple[str, int, int]], until: float
    ) -> list[tuple[str, int]]:
        """Extend the leases of ``(batch_id, idx, token)``; return those that were lost."""
        ...

    async def release_shard(self, claim: ShardClaim, not_before: float) -> bool:
        """Give a held shard back without a checkpoint, not to be claimed before
        ``not_before``. Fenced by the claim's token: False if it was not held."""
        ...

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
        """One shard's checkpoint; raises :class:`batchd.errors.LeaseLost` (nothing
        changed) when another worker holds the shard now."""
        ...

    async def checkpoint_many(
        self, checkpoints: Sequence[ShardCheckpoint]
    ) -> list[tuple[str, int]]:
        """Several shards' checkpoints in one transaction, each fenced by its own token;
        the shards whose lease was lost (nothing of them stored). For each other shard its
        part, done-bitmap and its batch's counters are stored together.

        Positions: each batch's new parts get ``first_pos`` from the batch's ``completed +
        failed`` before this commit, in the order of ``checkpoints``, so a batch's
        positions are contiguous from 0 and in commit order across every process on the
        store."""
        ...

    async def claim_finalize(
        self, owner: str, now: float, lease_seconds: float, ids: tuple[str, str]
    ) -> BatchRecord | None:
        """Lease one batch ready to finalise (in progress with every shard done,
        cancelling, or past its deadline; no shard leased), lowest id first. ``ids``: the
        output and error file ids, kept only if the batch has none yet."""
        ...

    async def renew_finalize(self, batch_id: str, owner: str, until: float) -> bool:
        """Extend the finalising lease; False if it was lost or the batch ended."""
        ...

    async def mark_finalizing(self, batch_id: str, owner: str, at: int) -> None:
        """in_progress -> finalizing, while ``owner`` holds the finalising lease."""
        ...

    async def batch_shards(self, batch_id: str) -> list[tuple[int, ShardSpan, bytes]]:
        """``(idx, span, done-bitmap)`` of each shard, by idx."""
        ...

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
        """End the batch with ``status`` (terminal; ``ValueError`` otherwise), record its
        result files and the ``batch.<status>`` event, in one transaction; its parts stay
        (they are its results, see :meth:`result_parts`). False (nothing changed) if the
        lease was lost or the batch ended."""
        ...

    async def result_parts(self, batch_id: str, after_pos: int = -1) -> list[Part]:
        """The committed parts of a batch holding a position after ``after_pos`` (their
        last position ``first_pos + lines - 1`` is greater), by ``first_pos``: the order
        their results were committed. Empty for an unknown batch."""
        ...

    async def commit_last_part(self, part: Part, owner: str) -> bool:
        """Add a finalising batch's last part (its never-executed requests, shard
        :data:`batchd.models.UNEXECUTED_SHARD`) with its counts, positions after every
        executed result, fenced by ``owner``'s finalising lease. Idempotent: True when the
        part (same batch, shard and seq) is stored, now or by an earlier attempt; False
        (nothing changed) when the lease was lost or the batch ended."""
        ...

    async def batches_with_results_gone(self, limit: int = 100) -> list[str]:
        """Up to ``limit`` ended batches that still have parts while none of their result
        files is left (never made, purged, or marked deleted): their parts can go."""
        ...

    async def delete_result_parts(self, batch_id: str) -> None:
        """Forget a batch's parts (the caller deletes their blobs first)."""
        ...

    async def queue_state(self, now: float) -> QueueState:
        """Batches by status, shards waiting and leased, slot leases."""
        ...


class OutboxStore(Protocol):
    """Events recorded with the transaction that ended a batch, delivered by webhooks."""

    async def claim_events(
        self, now: float, lease_seconds: float, limit: int = 50
    ) -> list[BatchEvent]:
        """Up to ``limit`` undelivered events due by ``now``, by id, leased by pushing their
        next attempt ``lease_seconds`` past ``now``."""
        ...

    async def event_done(self, event_id: str, at: int) -> None: ...

    async def event_retry(self, event_id: str, attempts: int, next_at: float | None) -> None:
        """Record a failed delivery; ``next_at`` None gives up on the event."""
        ...


class UsageStore(Protocol):
    async def token_usage(self, project: str | None = None) -> list[TokenUsage]:
        """One row per (project, model) that has batches, ordered; one project's, or all."""
        ...


class SlotStore(Protocol):
    """This process's shares of the deployments' in-flight slots (:mod:`batchd.store.slots`);
    every implementation shares them out with :func:`batchd.store.types.grants_for` and keeps
    the rows of :func:`batchd.store.types.slot_leases`."""

    async def lease_slots(
        self,
        owner: str,
        demands: dict[str, SlotDemand],
        now: float,
        until: float,
        weight: Callable[[str], float] = even,
    ) -> dict[str, SlotGrant]:
        """Renew ``owner``'s shares until ``until``; ``weight(project)``: the projects'
        relative shares (1.0 each when not given)."""
        ...

    async def live_engines(self, now: float) -> int:
        """Engine processes holding an unexpired slot lease."""
        ...

    async def release_slots(self, owner: str) -> None: ...


class IdempotencyKeyStore(Protocol):
    """``Idempotency-Key`` records per project and kind (see :class:`KeyState`)."""

    async def claim(
        self, project: str, kind: str, key: str, fingerprint: str, now: int
    ) -> KeyState: ...

    async def finish(self, project: str, kind: str, key: str, result_id: str) -> None: ...

    async def release(self, project: str, kind: str, key: str) -> None: ...

    async def forget_lapsed(self, now: int) -> int: ...


class LeaseStore(Protocol):
    """Named leases: one holder at a time across every process on the store."""

    async def acquire(self, name: str, owner: str, now: float, seconds: float) -> bool: ...

    async def release(self, name: str, owner: str) -> None: ...


class MessageBatchRecords(Protocol):
    """Anthropic's message batches, each naming the batch that runs it."""

    async def insert(self, row: MessageBatchRow) -> None: ...

    async def get(self, project: str, mb_id: str) -> tuple[MessageBatchRow, BatchRecord] | None:
        ...

    async def list(
        self, project: str, *, limit: int, after: str | None, before: str | None
    ) -> tuple[list[tuple[MessageBatchRow, BatchRecord]], bool]: ...

    async def keep_counts(self, mb_id: str, counts: dict[str, int]) -> None: ...

    async def mark_deleted(self, project: str, mb_id: str, at: int) -> bool: ...


class Connection(Protocol):
    async def ping(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Store:
    """One implementation of every aggregate over one backing store.

    ``idempotency_keys(ttl, stale)`` builds the idempotency keys with their times (seconds);
    ``keys`` is the one with the defaults (24 h, 1 h)."""

    files: FileStore
    batches: BatchStore
    queue: QueueStore
    outbox: OutboxStore
    usage: UsageStore
    slots: SlotStore
    leases: LeaseStore
    message_batches: MessageBatchRecords
    idempotency_keys: Callable[[int, int], IdempotencyKeyStore]
    connection: Connection

    @property
    def keys(self) -> IdempotencyKeyStore:
        return self.idempotency_keys(86400, 3600)

    async def ping(self) -> None:
        """Raises :class:`batchd.errors.StoreError` when the store does not answer."""
        await self.connection.ping()

    async def close(self) -> None:
        await self.connection.close()
