"""A cluster's backing services: a fresh PostgreSQL database and an S3-compatible server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fresh_database, start_moto


@pytest.fixture
def cluster_database() -> Iterator[str]:
    """An empty database: the first process to start migrates it."""
    with fresh_database("batchd_cluster") as url:
        yield url


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[str]:
    url, proc = start_moto(tmp_path)
    yield url
    proc.stop()
