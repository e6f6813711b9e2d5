"""Batches on a store, set up through its own methods as the services set them up: for the
engine and service tests on the in-memory store and the isolation tests on every store."""

from __future__ import annotations

from batchd.blobs.base import Blobs
from batchd.blobs.keys import input_key
from batchd.models import FILE_PROCESSED, VALIDATING, BatchRecord, FileRecord, new_id, now
from batchd.service.validation import Validator
from batchd.store.protocols import Store
from tests.support import chat_lines

MODEL = "m"  # the model of :func:`lines` (give the settings a deployment of it)


def lines(n: int, prefix: str) -> bytes:
    """``n`` chat completion lines for :data:`MODEL`, custom_ids ``<prefix>-<i>``."""
    return chat_lines(n, model=MODEL, prefix=prefix)


async def make_batch(
    store: Store, blobs: Blobs, data: bytes, project: str = "p", *, shard_lines: int = 2
) -> BatchRecord:
    """A validated input file of ``data`` (stored, its summary cut into shards of
    ``shard_lines`` lines) and a batch on it for /v1/chat/completions, still ``validating``:
    created as :class:`batchd.service.batches.BatchService` creates one, not yet started
    (start it with :class:`batchd.service.activation.Activator`)."""
    v = Validator(max_lines=1000, max_line_bytes=1 << 20, shard_lines=shard_lines)
    v.feed(data)
    summary = v.finish()
    fid = new_id("file-")
    await blobs.put(input_key(fid), data)
    await store.files.insert_file(
        FileRecord(
            fid,
            project,
            "in.jsonl",
            "batch",
            len(data),
            now(),
            FILE_PROCESSED,
            input_key(fid),
            summary=summary,
        )
    )
    t = now()
    batch = BatchRecord(
        id=new_id("batch_"),
        project=project,
        endpoint="/v1/chat/completions",
        input_file_id=fid,
        completion_window="24h",
        status=VALIDATING,
        created_at=t,
        expires_at=t + 86400,
        input_blob_key=input_key(fid),
    )
    await store.batches.insert_batch(batch)
    return batch
