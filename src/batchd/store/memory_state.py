"""The rows of the in-memory store (:mod:`batchd.store.memory`): one :class:`MemoryState`
holds every table as dicts keyed like the tables' primary keys, with the helpers several
aggregates share. Each aggregate's memory implementation reads and changes it through
``state.<table>`` (never a dict kept aside: a rolled-back transaction replaces them)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

from batchd.errors import StoreError
from batchd.models import (
    CANCELLING,
    SHARD_PENDING,
    VALIDATING,
    BatchEvent,
    BatchRecord,
    FileRecord,
    Part,
    ShardSpan,
    Usage,
    new_id,
)
from batchd.store.types import UNFINISHED, MessageBatchRow


@dataclass
class FileRow:
    rec: FileRecord
    deleted_at: int | None = None


@dataclass
class BatchRow:
    rec: BatchRecord
    final_owner: str | None = None
    final_until: float | None = None


@dataclass
class ShardRow:
    span: ShardSpan
    status: str = SHARD_PENDING
    token: int = 0
    done: bytes = b""
    part_seq: int = 0
    lease_owner: str | None = None
    lease_until: float | None = None
    not_before: float | None = None

    def leased(self, now: float) -> bool:
        return self.lease_until is not None and self.lease_until >= now


@dataclass
class EventRow:
    event: BatchEvent
    next_attempt_at: float | None = 0.0
    delivered_at: int | None = None


@dataclass
class SlotRow:
    want: int
    slots: int
    until: float
    projects: dict[str, int]


@dataclass
class KeyRow:
    """One ``Idempotency-Key`` of a project and kind."""

    fingerprint: str
    result_id: str | None
    created_at: int


@dataclass
class MemoryState:
    """Every table of the store, as dicts keyed like the tables' primary keys."""

    files: dict[str, FileRow] = field(default_factory=dict)
    batches: dict[str, BatchRow] = field(default_factory=dict)
    shards: dict[str, dict[int, ShardRow]] = field(default_factory=dict)  # batch -> idx -> shard
    parts: dict[tuple[str, int, int], Part] = field(default_factory=dict)
    events: dict[str, EventRow] = field(default_factory=dict)
    slots: dict[tuple[str, str], SlotRow] = field(default_factory=dict)  # (deployment, owner)
    keys: dict[tuple[str, str, str], KeyRow] = field(default_factory=dict)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> owner, until
    message_batches: dict[str, MessageBatchRow] = field(default_factory=dict)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo every change of the block if it raises (a rolled-back transaction)."""
        saved = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        try:
            yield
        except BaseException:
            for name, value in saved.items():
                setattr(self, name, value)
            raise

    # -- helpers shared by the aggregates ------------------------------------------------
    def add_file(self, rec: FileRecord) -> None:
        if rec.id in self.files:
            raise StoreError(f"metadata store write failed: duplicate file id {rec.id}")
        self.files[rec.id] = FileRow(copy.deepcopy(rec))

    def not_started(self, b: BatchRow) -> bool:
        """Validating, or cancelled before its shards were made."""
        return b.rec.status == VALIDATING or (
            b.rec.status == CANCELLING and not self.shards.get(b.rec.id)
        )

    def in_use(self, blob_key: str) -> bool:
        return any(
            b.rec.input_blob_key == blob_key and b.rec.status in UNFINISHED
            for b in self.batches.values()
        )

    def record_event(self, batch_id: str, status: str, at: int) -> None:
        """Add ``batch.<status>`` to the outbox (with the change that ended the batch)."""
        project = self.batches[batch_id].rec.project
        event = BatchEvent(new_id("evt_"), project, batch_id, f"batch.{status}", at, 0)
        self.events[event.id] = EventRow(event)

    def add_part(self, part: Part, usage: Usage) -> None:
        """Commit ``part`` to its batch: its first position is the batch's ``completed +
        failed`` before its counts are added (the SQL store's rule), ``usage`` added too."""
        key = (part.batch_id, part.shard_idx, part.seq)
        if key in self.parts:
            raise StoreError(f"metadata store write failed: duplicate part {key}")
        rec = self.batches[part.batch_id].rec
        self.parts[key] = replace(part, first_pos=rec.completed + rec.failed)
        rec.completed += part.out_lines
        rec.failed += part.err_lines
        rec.usage = Usage(
            rec.usage.input_tokens + usage.input_tokens,
            rec.usage.cached_tokens + usage.cached_tokens,
            rec.usage.output_tokens + usage.output_tokens,
            rec.usage.reasoning_tokens + usage.reasoning_tokens,
        )

    def drop_parts(self, batch_id: str) -> None:
        for key in [k for k in self.parts if k[0] == batch_id]:
            del self.parts[key]

    def drop_batch(self, batch_id: str) -> None:
        """Delete a batch and what refers to it (the tables' ``ON DELETE CASCADE``)."""
        del self.batches[batch_id]
        self.shards.pop(batch_id, None)
        self.drop_parts(batch_id)
        for mb in [m.id for m in self.message_batches.values() if m.batch_id == batch_id]:
            del self.message_batches[mb]
