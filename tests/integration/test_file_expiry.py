"""Files past their expires_at disappear, and their bytes go once no batch reads them;
one retention reaper at a time across replicas (issue 12 item 5). In memory, on SQLite and
on PostgreSQL (the ``store`` and ``replicas`` fixtures)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from batchd.blobs.local import LocalBlobs
from batchd.config import load_settings
from batchd.models import FILE_PROCESSED, VALIDATING, BatchRecord, FileRecord, new_id, now
from batchd.service.files import FileService
from batchd.service.retention import Reaper
from batchd.store.protocols import Store


async def test_expired_files_are_deleted(store: Store, tmp_path: Path) -> None:
    blobs = LocalBlobs(tmp_path / "files")
    t = now()
    for fid, expires in (("file-old", t - 1), ("file-new", t + 3600), ("file-none", None)):
        await blobs.put(f"inputs/{fid}", b"{}\n")
        await store.files.insert_file(
            FileRecord(
                fid,
                "p",
                "a.jsonl",
                "batch",
                3,
                t - 10,
                FILE_PROCESSED,
                f"inputs/{fid}",
                expires_at=expires,
            )
        )
    assert await store.files.expire_files(t) == 1
    assert await store.files.get_file("file-old") is None
    assert await store.files.get_file("file-new") is not None
    assert await store.files.get_file("file-none") is not None
    assert await store.files.count_files("p") == 2
    gone = await store.files.deleted_files_unreferenced()
    assert [f.id for f in gone] == ["file-old"]
    assert await store.files.expire_files(t) == 0
    assert await store.files.expire_files(t + 3600) == 1  # file-new's time has come
    assert [f.id for f in await store.files.deleted_files_unreferenced()] == [
        "file-new",
        "file-old",
    ]
    await store.files.purge_file("file-old")
    await store.files.purge_file("file-missing")  # nothing to forget: no error
    assert [f.id for f in await store.files.deleted_files_unreferenced()] == ["file-new"]
    assert await store.files.get_file("file-none") is not None


async def test_one_reaper_at_a_time_deletes_expired_bytes_and_rows(
    replicas: tuple[Store, Store], tmp_path: Path
) -> None:
    """Two replicas' reapers: one holds the lease and reaps; an expired result file loses its
    bytes and row, an expired input that a running batch reads keeps its bytes until the
    batch ends; a pass that crashed between bytes and row is finished by the next."""
    stores = list(replicas)
    blobs = LocalBlobs(tmp_path / "files")
    settings = load_settings(None, data_dir=str(tmp_path))
    reapers = [
        Reaper(s, FileService(settings, s.files, blobs), owner=f"engine-{i}", lease_seconds=60)
        for i, s in enumerate(stores)
    ]
    store = stores[0]
    t = now()
    for fid, purpose, key in (
        ("file-out", "batch_output", "outputs/file-out"),
        ("file-in", "batch", "inputs/file-in"),
        ("file-crashed", "batch_output", "outputs/file-crashed"),
    ):
        if fid != "file-crashed":  # its bytes went before a crash, its row stayed
            await blobs.put(key, b"{}\n")
        await store.files.insert_file(
            FileRecord(
                fid, "p", "a.jsonl", purpose, 3, t - 10, FILE_PROCESSED, key, expires_at=t - 1
            )
        )
    running = BatchRecord(
        id=new_id("batch_"),
        project="p",
        endpoint="/v1/chat/completions",
        input_file_id="file-in",
        completion_window="24h",
        status=VALIDATING,
        created_at=t,
        expires_at=t + 86400,
        input_blob_key="inputs/file-in",
    )
    await store.batches.insert_batch(running)
    took = await asyncio.gather(*(r.reap() for r in reapers))
    assert sorted(took) == [False, True]
    assert not (tmp_path / "files" / "outputs" / "file-out").exists()
    assert (tmp_path / "files" / "inputs" / "file-in").exists()  # still read
    assert [f.id for f in await store.files.deleted_files_unreferenced()] == []
    holder = reapers[took.index(True)]
    assert await holder.reap()  # renewed by its holder
    await holder.release()  # a clean stop: the other takes over at once
    other = reapers[took.index(False)]
    await store.batches.fail_batch(running.id, [], t)
    assert await other.reap()
    assert not (tmp_path / "files" / "inputs" / "file-in").exists()
    assert [f.id for f in await store.files.deleted_files_unreferenced()] == []
    for fid in ("file-out", "file-in", "file-crashed"):
        assert await store.files.get_file(fid) is None
