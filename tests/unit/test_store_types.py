"""The store's contracts and its in-memory implementation load no SQL: the Protocols
(store/protocols.py), their records and pure rules (store/types.py) and the memory store
import neither SQLAlchemy nor the schema, so that a service or an engine test on the memory
store pays for none of it."""

from __future__ import annotations

import subprocess
import sys

import pytest

SQL = ("sqlalchemy", "alembic", "asyncpg", "aiosqlite", "batchd.store.schema", "batchd.store.db")


@pytest.mark.parametrize(
    "module", ["batchd.store.memory", "batchd.store.protocols", "batchd.store.types"]
)
def test_importing_loads_no_sql(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(m for m in {SQL!r} if m in sys.modules) or 'none')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["none"]


def test_the_check_sees_sql_when_it_is_loaded() -> None:
    """The same check on the SQL store names what it loads (the test above can fail)."""
    code = (
        "import sys, batchd.store.sql\n"
        f"print(' '.join(m for m in {SQL!r} if m in sys.modules) or 'none')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert {"sqlalchemy", "batchd.store.schema", "batchd.store.db"} <= set(out.stdout.split())
