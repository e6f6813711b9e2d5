"""A cluster's backing services: a fresh PostgreSQL database and an S3-compatible server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import pg_admin, pg_url, require_postgres, start_moto


@pytest.fixture
def cluster_database() -> Iterator[str]:
    """An empty database: the first process to start migrates it."""
    require_postgres()
    name = f"batchd_cluster_{uuid.uuid4().hex[:10]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url(name)
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[str]:
    url, proc = start_moto(tmp_path)
    yield url
    proc.stop()
