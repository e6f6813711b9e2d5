"""Real backing services for the integration tier: a PostgreSQL database per test run, an
S3-compatible server (moto) per module."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from batchd.store.connect import migrate, open_store
from batchd.store.memory import memory_store
from batchd.store.memory_state import MemoryState
from batchd.store.protocols import Store
from tests.support import fresh_database, pg_admin, pg_url, require_postgres, start_moto


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated database for this test run; each test gets a fresh copy of it."""
    require_postgres()
    import asyncio

    from batchd.store.connect import migrate

    name = f"batchd_test_{uuid.uuid4().hex[:10]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    try:
        asyncio.run(migrate(pg_url(name)))
        yield name
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database(pg_template: str) -> Iterator[str]:
    """A fresh, migrated database (copied from the template) for one test; its URL."""
    with fresh_database(pg_template, template=pg_template) as url:
        yield url


@pytest.fixture
def empty_pg_database() -> Iterator[str]:
    with fresh_database("batchd_test") as url:
        yield url


def _database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'batchd.db'}"
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on SQLite and on a fresh, migrated PostgreSQL database."""
    return _database(request, tmp_path)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the store contract runs: "memory" (:mod:`batchd.store.memory`), or the URL of a
    migrated database, SQLite or a fresh PostgreSQL one, so that no implementation drifts
    from the others."""
    if request.param == "memory":
        return "memory"
    return _database(request, tmp_path)


@pytest.fixture
async def open_stores(backend: str) -> AsyncIterator[Callable[[], Store]]:
    """Opens stores on one backing database, each with its own connections (in memory: one
    state): each call is one more server."""
    if backend != "memory":
        await migrate(backend)  # a no-op on the migrated PostgreSQL copy: proves it idempotent
    state = MemoryState()
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(memory_store(state) if backend == "memory" else open_store(backend))
        return opened[-1]

    yield open_one
    for s in opened:
        await s.close()


@pytest.fixture
def store(open_stores: Callable[[], Store]) -> Store:
    """A store of the contract suite, on each backend."""
    return open_stores()


@pytest.fixture
def replicas(open_stores: Callable[[], Store]) -> tuple[Store, Store]:
    """Two stores on one database, each with its own connections: two servers."""
    return open_stores(), open_stores()


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free port; its endpoint URL."""
    tmp: Path = tmp_path_factory.mktemp("moto")
    url, proc = start_moto(tmp)
    yield url
    proc.stop()
