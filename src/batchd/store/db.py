"""The store's connections: one writer and one reader engine, transactions, advisory locks.

Every aggregate of the SQL store (:mod:`batchd.store.files`, :mod:`batchd.store.batches`,
:mod:`batchd.store.queue`, ...) runs its statements through one :class:`Database`, so that
they share its engines and its rules. SQLite: all writes of a process go through one
connection with ``BEGIN IMMEDIATE`` (no "database is locked" between our own tasks; other
processes wait on ``busy_timeout``), reads use a small pool of their own in WAL mode.
PostgreSQL: one pool; claims use ``FOR UPDATE SKIP LOCKED`` so that workers never wait on
each other. Driver errors become :class:`batchd.errors.StoreError` here and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd.errors import StoreError


class Database:
    """The engines of one metadata database. Build with :func:`batchd.store.open_store`."""

    def __init__(self, writer: AsyncEngine, reader: AsyncEngine) -> None:
        self._writer = writer
        self._reader = reader
        self.dialect = writer.dialect.name

    async def close(self) -> None:
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction; committed when the block ends, rolled back if it raises."""
        try:
            async with self._writer.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"metadata store write failed: {exc}") from exc

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._reader.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"metadata store read failed: {exc}") from exc

    def skip_locked(self) -> dict[str, Any]:
        """``with_for_update`` arguments: skip rows another transaction holds (PostgreSQL)."""
        return {"skip_locked": True} if self.dialect == "postgresql" else {}

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.execute(select(1))

    async def lock(self, conn: AsyncConnection, namespace: int, key: str) -> None:
        """Hold ``(namespace, key)`` until the transaction ends (PostgreSQL; on SQLite the
        write transaction is exclusive already)."""
        if self.dialect == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:ns, hashtext(:key))"),
                {"ns": namespace, "key": key},
            )
