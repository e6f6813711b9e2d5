"""Anthropic's message batches in memory (:mod:`batchd.store.memory`), with the contract
of their SQL store (:mod:`batchd.store.message_batches`)."""

from __future__ import annotations

import copy
from dataclasses import replace

from batchd.errors import StoreError
from batchd.models import BatchRecord
from batchd.store.memory_state import MemoryState
from batchd.store.types import MessageBatchRow


class MemoryMessageBatches:
    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def _visible(self, project: str) -> list[tuple[MessageBatchRow, BatchRecord]]:
        return [
            (copy.deepcopy(m), copy.deepcopy(self._s.batches[m.batch_id].rec))
            for m in self._s.message_batches.values()
            if m.project == project and m.deleted_at is None and m.batch_id in self._s.batches
        ]

    async def insert(self, row: MessageBatchRow) -> None:
        """Raises :class:`StoreError` as the table's keys do: a duplicate id, a batch that
        does not exist, or one that has a message batch already (deleted or not)."""
        taken = any(m.batch_id == row.batch_id for m in self._s.message_batches.values())
        if row.id in self._s.message_batches or row.batch_id not in self._s.batches or taken:
            raise StoreError(f"metadata store write failed: message batch {row.id}")
        self._s.message_batches[row.id] = MessageBatchRow(
            row.id, row.project, row.batch_id, row.created_at
        )

    async def get(self, project: str, mb_id: str) -> tuple[MessageBatchRow, BatchRecord] | None:
        return next((r for r in self._visible(project) if r[0].id == mb_id), None)

    async def list(
        self, project: str, *, limit: int, after: str | None, before: str | None
    ) -> tuple[list[tuple[MessageBatchRow, BatchRecord]], bool]:
        rows = self._visible(project)
        if before:
            rows = sorted((r for r in rows if r[0].id > before), key=lambda r: r[0].id)
        else:
            rows = [r for r in rows if not after or r[0].id < after]
            rows.sort(key=lambda r: r[0].id, reverse=True)
        out = rows[:limit]
        return (out[::-1] if before else out), len(rows) > limit

    async def keep_counts(self, mb_id: str, counts: dict[str, int]) -> None:
        m = self._s.message_batches.get(mb_id)
        if m is not None:
            self._s.message_batches[mb_id] = replace(m, counts=dict(counts))

    async def mark_deleted(self, project: str, mb_id: str, at: int) -> bool:
        m = self._s.message_batches.get(mb_id)
        if m is None or m.project != project or m.deleted_at is not None:
            return False
        self._s.message_batches[mb_id] = replace(m, deleted_at=at)
        return True
