"""File records in the SQL store (:class:`batchd.store.protocols.FileStore`)."""

from __future__ import annotations

from sqlalchemy import delete, exists, func, insert, select, update

from batchd.errors import QuotaExceeded
from batchd.models import FileRecord
from batchd.store.db import Database
from batchd.store.rows import file_record, file_values
from batchd.store.schema import batches, files
from batchd.store.types import UNFINISHED

# Namespace of the PostgreSQL advisory lock that makes the file count's check and its take
# one step between replicas (key: the project; limits.max_files).
LOCK_FILE_COUNT = 0x62640001

_LISTED = [c for c in files.c if c.name != "summary"]


class SqlFileStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def insert_file(self, rec: FileRecord, *, max_files: int | None = None) -> None:
        """Record a file. With ``max_files``, only while its project has fewer files (not
        deleted, result files included): counted and taken in this one transaction under a
        per-project lock, so concurrent uploads on any number of replicas never pass the
        limit. Raises :class:`QuotaExceeded` (nothing recorded) at the limit."""
        async with self._db.write() as conn:
            if max_files is not None:
                await self._db.lock(conn, LOCK_FILE_COUNT, rec.project)
                used = (
                    await conn.execute(
                        select(func.count()).where(
                            files.c.project == rec.project, files.c.deleted_at.is_(None)
                        )
                    )
                ).scalar_one()
                if used >= max_files:
                    raise QuotaExceeded(f"{used} files of {max_files}", used=int(used))
            await conn.execute(insert(files).values(**file_values(rec)))

    async def get_file(self, file_id: str, project: str | None = None) -> FileRecord | None:
        q = select(files).where(files.c.id == file_id, files.c.deleted_at.is_(None))
        if project is not None:
            q = q.where(files.c.project == project)
        async with self._db.read() as conn:
            row = (await conn.execute(q)).mappings().first()
        return file_record(row) if row else None

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
        q = select(*_LISTED).where(files.c.deleted_at.is_(None))
        if project is not None:
            q = q.where(files.c.project == project)
        if purpose:
            q = q.where(files.c.purpose == purpose)
        if after:
            q = q.where(files.c.id > after if order == "asc" else files.c.id < after)
        q = q.order_by(files.c.id.asc() if order == "asc" else files.c.id.desc()).limit(limit + 1)
        async with self._db.read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [file_record(r, with_summary=False) for r in rows]

    async def count_files(self, project: str) -> int:
        q = select(func.count()).where(files.c.project == project, files.c.deleted_at.is_(None))
        async with self._db.read() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def mark_file_deleted(self, file_id: str, project: str, at: int) -> FileRecord | None:
        async with self._db.write() as conn:
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
            return file_record(row, with_summary=False)

    async def blob_in_use(self, blob_key: str) -> bool:
        """Whether an unfinished batch still reads this input blob."""
        q = select(
            exists().where(batches.c.input_blob_key == blob_key, batches.c.status.in_(UNFINISHED))
        )
        async with self._db.read() as conn:
            return bool((await conn.execute(q)).scalar_one())

    async def purge_file(self, file_id: str) -> None:
        async with self._db.write() as conn:
            await conn.execute(delete(files).where(files.c.id == file_id))

    async def deleted_files_unreferenced(self, limit: int = 100) -> list[FileRecord]:
        referenced = exists().where(
            batches.c.input_blob_key == files.c.blob_key, batches.c.status.in_(UNFINISHED)
        )
        q = (
            select(*_LISTED)
            .where(files.c.deleted_at.is_not(None), ~referenced)
            .order_by(files.c.id)
            .limit(limit)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [file_record(r, with_summary=False) for r in rows]

    async def expire_files(self, now: int, limit: int = 100) -> int:
        """Mark files past their ``expires_at`` as deleted (their bytes are collected once no
        unfinished batch reads them). Returns how many expired."""
        async with self._db.write() as conn:
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
