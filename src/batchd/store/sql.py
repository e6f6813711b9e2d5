"""The SQL store: every aggregate on SQLAlchemy Core over one :class:`Database`, SQLite and
PostgreSQL, one contract (:mod:`batchd.store.protocols`)."""

from __future__ import annotations

from functools import partial

from batchd.store.batches import SqlBatchStore
from batchd.store.db import Database
from batchd.store.files import SqlFileStore
from batchd.store.keyed import IdempotencyKeys, Leases
from batchd.store.message_batches import MessageBatchStore
from batchd.store.outbox import SqlOutboxStore
from batchd.store.protocols import IdempotencyKeyStore, Store
from batchd.store.queue import SqlQueueStore
from batchd.store.slots import SqlSlotStore
from batchd.store.usage import SqlUsageStore


def _keys(db: Database, ttl: int, stale: int) -> IdempotencyKeyStore:
    return IdempotencyKeys(db, ttl=ttl, stale=stale)


def sql_store(db: Database) -> Store:
    """Every aggregate of the SQL store over ``db``'s engines."""
    return Store(
        files=SqlFileStore(db),
        batches=SqlBatchStore(db),
        queue=SqlQueueStore(db),
        outbox=SqlOutboxStore(db),
        usage=SqlUsageStore(db),
        slots=SqlSlotStore(db),
        leases=Leases(db),
        message_batches=MessageBatchStore(db),
        idempotency_keys=partial(_keys, db),
        connection=db,
    )
