"""Files past their expires_at disappear, and their bytes go once no batch reads them."""

from __future__ import annotations

from pathlib import Path

from batchd.blobs.local import LocalBlobs
from batchd.models import FILE_PROCESSED, FileRecord, now
from batchd.store.connect import migrate, open_store


async def test_expired_files_are_deleted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    await migrate(url)
    store = open_store(url)
    blobs = LocalBlobs(tmp_path / "files")
    try:
        t = now()
        for fid, expires in (("file-old", t - 1), ("file-new", t + 3600), ("file-none", None)):
            await blobs.put(f"inputs/{fid}", b"{}\n")
            await store.insert_file(
                FileRecord(fid, "p", "a.jsonl", "batch", 3, t - 10, FILE_PROCESSED,
                           f"inputs/{fid}", expires_at=expires)
            )
        assert await store.expire_files(t) == 1
        assert await store.get_file("file-old") is None
        assert await store.get_file("file-new") is not None
        assert await store.get_file("file-none") is not None
        gone = await store.deleted_files_unreferenced()
        assert [f.id for f in gone] == ["file-old"]
        assert await store.expire_files(t) == 0
    finally:
        await store.close()
