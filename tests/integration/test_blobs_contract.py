"""One blobs contract, run on the local directory and on a real S3-compatible server (moto)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchd.blobs.base import Blobs
from batchd.blobs.local import LocalBlobs
from batchd.blobs.s3 import MIN_PART, S3Blobs
from batchd.config import S3Settings
from batchd.errors import BlobError, BlobNotFound, ConfigError
from tests.support import S3_ENV

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Blobs]:
    store: Blobs
    if request.param == "local":
        store = LocalBlobs(tmp_path / "blobs")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        settings = S3Settings(
            endpoint_url=endpoint,
            access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region=S3_ENV["AWS_DEFAULT_REGION"],
        )
        # A fresh bucket per test (created by S3Blobs on first use), under a prefix, with
        # parts as small as S3 allows so that the tests cross part boundaries.
        store = S3Blobs(f"t-{uuid.uuid4().hex[:12]}", "some/prefix", settings, part_size=MIN_PART)
        await store.client()  # loading botocore's service model is not part of any test
    yield store
    await store.close()


async def listing(blobs: Blobs) -> list[str]:
    """Every object or file the store holds, including unfinished uploads."""
    if isinstance(blobs, LocalBlobs):
        root = blobs._root
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert isinstance(blobs, S3Blobs)
    client = await blobs.client()
    objects = await client.list_objects_v2(Bucket=blobs.bucket)
    uploads = await client.list_multipart_uploads(Bucket=blobs.bucket)
    return sorted(
        [o["Key"] for o in objects.get("Contents", [])]
        + [f"upload:{u['Key']}" for u in uploads.get("Uploads", [])]
    )


def test_s3_url_and_settings() -> None:
    s3 = S3Settings(endpoint_url="http://127.0.0.1:9000", region="eu-west-1")
    blobs = S3Blobs.from_settings("s3://bucket/a/b/", s3)
    assert (blobs.bucket, blobs.prefix) == ("bucket", "a/b")
    assert blobs.object_key("inputs/file-1") == "a/b/inputs/file-1"
    assert S3Blobs.from_settings("s3://bucket", s3).object_key("x/y") == "x/y"
    with pytest.raises(ConfigError):
        S3Blobs.from_settings("s3:///prefix", s3)
    with pytest.raises(BlobError):
        blobs.object_key("../escape")


async def test_write_commit_read(blobs: Blobs) -> None:
    async with blobs.writer("inputs/file-1") as w:
        await w.write(b"hello ")
        await w.write(b"world\n")
        assert await w.commit() == 12
    assert await blobs.read_all("inputs/file-1") == b"hello world\n"
    assert await blobs.size("inputs/file-1") == 12
    await blobs.put("inputs/empty", b"")
    assert await blobs.read_all("inputs/empty") == b""
    assert await blobs.size("inputs/empty") == 0


async def test_nothing_visible_before_commit_and_abort_leaves_nothing(blobs: Blobs) -> None:
    payload = os.urandom(MiB)
    w = blobs.writer("inputs/big")
    for _ in range(7):  # 7 MiB: past S3's smallest part, so a multipart upload is under way
        await w.write(payload)
    with pytest.raises(BlobNotFound):
        await blobs.size("inputs/big")
    await w.abort()
    assert await listing(blobs) == []
    with pytest.raises(BlobNotFound):
        await blobs.read_all("inputs/big")

    with pytest.raises(RuntimeError):
        async with blobs.writer("inputs/failed") as w2:
            await w2.write(b"partial")
            raise RuntimeError("upload broke")
    assert await listing(blobs) == []


async def test_ranged_reads(blobs: Blobs) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: spans more than one read chunk
    await blobs.put("k/ranged", data)
    assert await blobs.read_all("k/ranged", 10, 20) == data[10:20]
    assert await blobs.read_all("k/ranged", 1000) == data[1000:]
    assert await blobs.read_all("k/ranged", 0, len(data)) == data
    assert await blobs.read_all("k/ranged", len(data) - 4) == b"tail"
    assert await blobs.read_all("k/ranged", 5, 5) == b""
    assert await blobs.read_all("k/ranged", len(data)) == b""
    assert await blobs.read_all("k/ranged", len(data) - 2, len(data) + 100) == b"il"
    with pytest.raises(BlobNotFound):
        await blobs.read_all("k/missing", 0, 10)
    with pytest.raises(BlobNotFound):
        await blobs.size("k/missing")


async def test_delete(blobs: Blobs) -> None:
    await blobs.put("parts/a", b"a")
    await blobs.put("parts/b", b"b")
    await blobs.put("parts/c", b"c")
    await blobs.delete("parts/a")
    await blobs.delete("parts/a")  # already gone: no error
    with pytest.raises(BlobNotFound):
        await blobs.size("parts/a")
    await blobs.delete_many(["parts/b", "parts/c", "parts/never"])
    assert await listing(blobs) == []


async def test_concat(blobs: Blobs) -> None:
    big = os.urandom(6 * MiB)  # large enough for a server-side copy on S3
    pieces = {"p/1": b"one\n", "p/2": big, "p/3": b"three\n", "p/4": big[::-1], "p/5": b""}
    for key, data in pieces.items():
        await blobs.put(key, data)
    expected = b"".join(pieces.values())
    assert await blobs.concat("out/all", list(pieces)) == len(expected)
    assert await blobs.size("out/all") == len(expected)
    assert await blobs.read_all("out/all") == expected
    assert await blobs.concat("out/small", ["p/1", "p/3"]) == 10
    assert await blobs.read_all("out/small") == b"one\nthree\n"
    assert await blobs.concat("out/none", []) == 0
    assert await blobs.read_all("out/none") == b""


async def test_streamed_write_keeps_memory_bounded(blobs: Blobs) -> None:
    chunk = os.urandom(64 * 1024)
    total = 12 * MiB
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        async with blobs.writer("inputs/stream") as w:
            for _ in range(total // len(chunk)):
                await w.write(chunk)
            assert await w.commit() == total
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Buffering the file would take 12 MiB; one 5 MiB S3 part and its joined copy is the most.
    assert peak < total, f"peak {peak / MiB:.1f} MiB while writing {total / MiB:.0f} MiB"
    assert await blobs.size("inputs/stream") == total
    expected, got = hashlib.sha256(), hashlib.sha256()
    for _ in range(total // len(chunk)):
        expected.update(chunk)
    async for piece in blobs.read("inputs/stream"):
        got.update(piece)
    assert got.digest() == expected.digest()
