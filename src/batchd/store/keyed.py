"""Two small cluster-wide records on the metadata store: idempotency keys and named leases.

Both hold across replicas. An idempotency key is checked and taken in one transaction under
a per-key lock (PostgreSQL advisory lock; SQLite's write transactions run one at a time). A
lease is taken or renewed with one conditional update; a lease never taken before is
inserted in a second transaction, where a replica inserting the same name at the same time
loses on the primary key (``IntegrityError``: not taken), so one holder wins without a lock.
"""

from __future__ import annotations

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from batchd.errors import StoreError
from batchd.store.db import Database
from batchd.store.schema import idempotency_keys, leases
from batchd.store.types import KeyState, held_key

LOCK_IDEMPOTENCY = 0x62640003  # key: project, kind and idempotency key


class IdempotencyKeys:
    """``Idempotency-Key`` records per project and kind ("batch", "file").

    A key is kept ``ttl`` seconds from its first use (24 h, as CONTRACT.md's extensions
    section says); an entry whose request never finished (its process died) is taken over
    after ``stale`` seconds."""

    def __init__(self, db: Database, *, ttl: int = 86400, stale: int = 3600) -> None:
        self._db = db
        self._ttl = ttl
        self._stale = stale

    async def claim(
        self, project: str, kind: str, key: str, fingerprint: str, now: int
    ) -> KeyState:
        where = and_(
            idempotency_keys.c.project == project,
            idempotency_keys.c.kind == kind,
            idempotency_keys.c.key == key,
        )
        async with self._db.write() as conn:
            await self._db.lock(conn, LOCK_IDEMPOTENCY, f"{project}\n{kind}\n{key}")
            row = (await conn.execute(select(idempotency_keys).where(where))).mappings().first()
            if row is not None:
                held = held_key(
                    row["fingerprint"], row["result_id"], row["created_at"], fingerprint, now,
                    ttl=self._ttl, stale=self._stale,
                )
                if held is not None:
                    return held
                await conn.execute(delete(idempotency_keys).where(where))
            await conn.execute(
                insert(idempotency_keys).values(
                    project=project,
                    kind=kind,
                    key=key,
                    fingerprint=fingerprint,
                    result_id=None,
                    created_at=now,
                )
            )
            return KeyState("new")

    async def finish(self, project: str, kind: str, key: str, result_id: str) -> None:
        """Record the object the request holding the key made."""
        async with self._db.write() as conn:
            await conn.execute(
                update(idempotency_keys)
                .where(
                    idempotency_keys.c.project == project,
                    idempotency_keys.c.kind == kind,
                    idempotency_keys.c.key == key,
                )
                .values(result_id=result_id)
            )

    async def release(self, project: str, kind: str, key: str) -> None:
        """Forget a key whose request failed, so that a retry runs it again."""
        async with self._db.write() as conn:
            await conn.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.project == project,
                    idempotency_keys.c.kind == kind,
                    idempotency_keys.c.key == key,
                    idempotency_keys.c.result_id.is_(None),
                )
            )

    async def forget_lapsed(self, now: int) -> int:
        """Delete the keys past their time; how many."""
        async with self._db.write() as conn:
            res = await conn.execute(
                delete(idempotency_keys).where(idempotency_keys.c.created_at <= now - self._ttl)
            )
            return int(res.rowcount or 0)


class Leases:
    """Named leases: one holder at a time across every process on the store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def acquire(self, name: str, owner: str, now: float, seconds: float) -> bool:
        """Take or renew ``name`` for ``owner`` until ``now + seconds``: True when ``owner``
        holds it (it was free, lapsed, or ``owner``'s already). Two transactions when the
        name has no row yet: the update finds none, then the insert (False if another
        process inserted first)."""
        async with self._db.write() as conn:
            res = await conn.execute(
                update(leases)
                .where(leases.c.name == name, or_(leases.c.owner == owner, leases.c.until < now))
                .values(owner=owner, until=now + seconds)
            )
            if res.rowcount:
                return True
            held = (await conn.execute(select(leases.c.name).where(leases.c.name == name))).first()
            if held is not None:
                return False
        try:
            async with self._db.write() as conn:
                await conn.execute(
                    insert(leases).values(name=name, owner=owner, until=now + seconds)
                )
        except StoreError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                return False  # another process inserted it first
            raise
        return True

    async def release(self, name: str, owner: str) -> None:
        async with self._db.write() as conn:
            await conn.execute(delete(leases).where(leases.c.name == name, leases.c.owner == owner))
