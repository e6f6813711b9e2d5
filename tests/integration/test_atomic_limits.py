"""Count- and token-based limits hold under concurrency, in memory, on SQLite and on
PostgreSQL, with two stores on one database standing for two replicas (issue 10); and a
batch row exists only once its create succeeded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batchd.blobs.local import LocalBlobs
from batchd.config import load_settings
from batchd.errors import QuotaExceeded
from batchd.models import (
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
    FileSummary,
    ShardSpan,
    new_id,
)
from batchd.service.activation import Activator
from batchd.service.batches import BatchService
from batchd.store.connect import migrate
from batchd.store.protocols import Store
from tests.integration.test_store_contract import file_rec


def batch_rec(project: str = "p") -> BatchRecord:
    return BatchRecord(
        id=new_id("batch_"),
        project=project,
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status=VALIDATING,
        created_at=1,
        expires_at=10**10,
        input_blob_key="inputs/x",
    )


async def test_max_files_holds_under_concurrency(replicas: tuple[Store, Store]) -> None:
    async def upload(i: int) -> bool:
        try:
            await replicas[i % 2].files.insert_file(file_rec(), max_files=10)
        except QuotaExceeded:
            return False
        return True

    stored = await asyncio.gather(*(upload(i) for i in range(60)))
    assert sum(stored) == 10
    assert await replicas[0].files.count_files("p") == 10
    # Per project: another project still has room, a deleted file frees a place.
    await replicas[1].files.insert_file(file_rec("q"), max_files=10)
    victim = (
        await replicas[0].files.list_files("p", purpose=None, limit=1, after=None, order="asc")
    )[0]
    await replicas[0].files.mark_file_deleted(victim.id, "p", at=2)
    await replicas[1].files.insert_file(file_rec(), max_files=10)
    with pytest.raises(QuotaExceeded) as exc:
        await replicas[0].files.insert_file(file_rec(), max_files=10)
    assert exc.value.used == 10


async def test_enqueued_tokens_hold_under_concurrency(replicas: tuple[Store, Store]) -> None:
    recs = [batch_rec() for _ in range(12)]
    for r in recs:
        await replicas[0].batches.insert_batch(r)
    spans = [ShardSpan(0, 10, 1, 1)]

    async def activate(i: int) -> bool:
        try:
            return await replicas[i % 2].batches.activate_batch(
                recs[i].id, model="m", spans=spans, token_estimate=40, at=2, token_limit=100
            )
        except QuotaExceeded as exc:
            assert exc.used >= 80  # refused only when two are in already
            return False

    activated = await asyncio.gather(*(activate(i) for i in range(len(recs))))
    assert sum(activated) == 2
    assert await replicas[0].batches.enqueued_tokens("m") == 80
    statuses = [(await replicas[1].batches.get_batch(r.id)) for r in recs]
    assert sorted(b.status for b in statuses if b) == [IN_PROGRESS] * 2 + [VALIDATING] * 10
    # Another model has its own quota; no limit means no check.
    other = batch_rec()
    await replicas[0].batches.insert_batch(other)
    assert await replicas[1].batches.activate_batch(
        other.id, model="n", spans=spans, token_estimate=90, at=2, token_limit=100
    )


async def test_a_batch_whose_activation_raises_is_not_left_validating(
    replicas: tuple[Store, Store], tmp_path: Path
) -> None:
    """The create fails as a whole: no batch row stays ``validating`` behind it."""
    store = replicas[0]
    settings = load_settings(
        None,
        data_dir=str(tmp_path),
        deployments=[{"model": "gpt-4o", "base_url": "http://127.0.0.1:9/v1"}],
    )
    # A summary the store cannot write: a shard offset past any 64-bit column.
    summary = FileSummary(
        lines=1,
        models={"gpt-4o": [1, 1]},
        urls={"/v1/chat/completions": [1, 1]},
        shards=[ShardSpan(2**70, 2**70 + 10, 1, 1)],
        token_estimate=5,
    )
    file = file_rec("p", summary)
    await store.files.insert_file(file)
    service = BatchService(
        settings, store.batches, store.files, Activator(settings, store.files, store.batches)
    )
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises for the overflow
        await service.create(
            "p",
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert await store.batches.list_batches("p", limit=10, after=None) == []
    assert await store.batches.validating_batches() == []


def test_local_blobs_and_database_are_private(tmp_path: Path) -> None:
    """0700 folders and 0600 files whatever the umask (it is 022 here)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        blobs = LocalBlobs(tmp_path / "data" / "files")
        asyncio.run(blobs.put("inputs/file-1", b"secret"))
        store_url = f"sqlite:///{tmp_path / 'db' / 'batchd.db'}"
        asyncio.run(migrate(store_url))
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "data") == 0o700
    assert mode(tmp_path / "data" / "files") == 0o700
    assert mode(tmp_path / "data" / "files" / "inputs") == 0o700
    assert mode(tmp_path / "data" / "files" / "inputs" / "file-1") == 0o600
    assert mode(tmp_path / "db") == 0o700
    for f in (tmp_path / "db").iterdir():
        assert mode(f) == 0o600, f
