"""Opening the store: engines, SQLite pragmas, and schema migrations (Alembic).

Alembic (with Mako) costs ~11 MB of memory in a process that imports it, so no long-running
process does: :func:`migrate` first reads the schema's version, and when it is behind runs
the upgrade in a short-lived child process.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from batchd.errors import ConfigError, StoreError
from batchd.filemodes import PRIVATE, make_dirs, touch
from batchd.store.db import Database
from batchd.store.protocols import Store
from batchd.store.sql import sql_store

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# Any fixed 64-bit number: the advisory lock that serialises migrations between replicas.
_MIGRATION_LOCK = 0x62617463686400
# The newest revision under migrations/versions (a test checks it against Alembic's head).
HEAD_REVISION = "0009"


def async_url(url: str) -> str:
    """Accept the URL forms users write and pick the async driver."""
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.split(":///", 1)[1]
    if url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite:///")):
        return url
    scheme = url.split("://", 1)[0] if "://" in url else ""
    raise ConfigError(  # never the URL itself: it may hold a password
        f"database_url: unsupported scheme {scheme[:32]!r} (use postgresql:// or sqlite:///)"
    )


def _prepare_sqlite_file(url: str) -> None:
    """Create a SQLite database's folder and empty file, private (0700/0600), before SQLite
    opens it: SQLite would create it under the umask, and its ``-wal`` and ``-shm`` files
    take the database file's mode. ``data_dir_mode``/``data_file_mode`` are applied at
    start-up (:func:`batchd.blobs.factory.protect_data_dir`)."""
    path = make_url(url).database
    if path and path != ":memory:" and not path.startswith("file:"):
        make_dirs(Path(path).parent, PRIVATE.dir)
        touch(Path(path), PRIVATE.file)


def _set_wal(cur: Any) -> None:
    """Switch to WAL. Two processes opening a new database at once can both try; SQLite then
    answers "locked" at once (no busy wait, to avoid a deadlock), so wait and try again."""
    deadline = time.monotonic() + 30.0
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_engine(url: str, *, writer: bool) -> AsyncEngine:
    engine = create_async_engine(
        url,
        pool_size=1 if writer else 4,
        max_overflow=0,
        connect_args={"timeout": 30},
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Manage transactions ourselves so that writes begin IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        _set_wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine


def open_store(database_url: str) -> Store:
    """The SQL store on ``database_url`` (SQLite or PostgreSQL); close it when done."""
    url = async_url(database_url)
    if url.startswith("sqlite"):
        _prepare_sqlite_file(url)
        db = Database(_sqlite_engine(url, writer=True), _sqlite_engine(url, writer=False))
    else:
        engine = create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
        db = Database(engine, engine)
    return sql_store(db)


def _alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(conn: Connection, url: str) -> None:
    from alembic import command

    cfg = _alembic_config(url)
    cfg.attributes["connection"] = conn
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
    command.upgrade(cfg, "head")


def _migration_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        _prepare_sqlite_file(url)
        # BEGIN IMMEDIATE: the write lock is taken before alembic reads its version table, so
        # a second process waits and then finds the schema up to date.
        return _sqlite_engine(url, writer=True)
    return create_async_engine(url, poolclass=NullPool)


async def schema_revision(database_url: str) -> str | None:
    """The schema's Alembic revision; None for a database never migrated."""
    engine = create_async_engine(async_url(database_url), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(text("SELECT version_num FROM alembic_version"))).first()
    except DBAPIError:
        return None  # no version table yet
    finally:
        await engine.dispose()
    return None if row is None else str(row[0])


async def upgrade_here(database_url: str) -> None:
    """Run the migrations to the head in this process."""
    url = async_url(database_url)
    engine = _migration_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade, url)
    finally:
        await engine.dispose()


_CHILD = """
import asyncio, sys
from batchd.store.connect import upgrade_here
try:
    asyncio.run(upgrade_here(sys.argv[1]))
except Exception as exc:
    sys.exit((str(exc) or type(exc).__name__).splitlines()[0])
"""


async def _upgrade_in_child(url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise StoreError(f"the schema migration failed: {lines[-1] if lines else proc.returncode}")


async def migrate(database_url: str) -> None:
    """Bring the schema to the newest version. Safe to run from many processes at once:
    PostgreSQL serialises them with an advisory lock, SQLite with its write lock. A schema
    already at :data:`HEAD_REVISION` costs one query; otherwise the upgrade runs in a child
    process, so that this one never loads Alembic."""
    url = async_url(database_url)
    if url.startswith("sqlite"):
        _prepare_sqlite_file(url)
    if await schema_revision(url) == HEAD_REVISION:
        return
    if url.startswith("sqlite") and make_url(url).database in (None, "", ":memory:"):
        await upgrade_here(url)  # a private in-memory database exists only in this process
        return
    await _upgrade_in_child(url)
