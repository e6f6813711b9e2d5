"""Real backing services for the integration tier: a PostgreSQL database per test run, an
S3-compatible server (moto) per module."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from batchd.store.connect import migrate, open_store
from batchd.store.sql import Store
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


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on SQLite and on a fresh, migrated PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'batchd.db'}"
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database, each with its own connections: two servers."""
    await migrate(database_url)
    a, b = open_store(database_url), open_store(database_url)
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free port; its endpoint URL."""
    tmp: Path = tmp_path_factory.mktemp("moto")
    url, proc = start_moto(tmp)
    yield url
    proc.stop()
