"""Batches on a store, set up through its own methods as the services set them up: for the
engine and service tests on the in-memory store and the isolation tests on every store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchd.backends.base import UpstreamResponse
from batchd.blobs.base import Blobs
from batchd.blobs.keys import input_key, part_key
from batchd.blobs.local import LocalBlobs
from batchd.config import Deployment, EngineSettings, Limits, Settings
from batchd.engine.finalize import Finalizer
from batchd.models import (
    FILE_PROCESSED,
    VALIDATING,
    BatchRecord,
    FileRecord,
    Part,
    ShardClaim,
    Usage,
    new_id,
    now,
)
from batchd.results.answer import answer_record
from batchd.service.activation import Activator
from batchd.service.batches import BatchService
from batchd.service.files import FileService
from batchd.service.results import ResultService
from batchd.service.validation import Validator
from batchd.store.memory import memory_store
from batchd.store.protocols import QueueStore, Store
from tests.support import chat_lines

MODEL = "m"  # the model of :func:`lines`
DEPLOYMENT = Deployment(model=MODEL, base_url="http://127.0.0.1:9/v1")  # never reached


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


async def commit_results(
    queue: QueueStore,
    blobs: Blobs,
    claim: ShardClaim,
    statuses: Sequence[int],
    *,
    first: int = 0,
    seq: int = 1,
    prefix: str = "r",
) -> list[bytes]:
    """Commit the answers to lines ``first``.. of a claimed shard of :func:`lines`
    (``prefix``) as one checkpoint, as the engine does: the result records as part ``seq``'s
    blob, the done-bitmap of every line up to the last answered, the usage. ``statuses``:
    the upstream's status codes, a 2xx with body ``{"n": <line>, "usage": 2 prompt and 3
    completion tokens}``, any other with an error body. The records, in order."""
    records, out, usage = [], 0, Usage()
    for i, status in enumerate(statuses, start=first):
        line = claim.span.first_line - 1 + i  # the file's line, 0-based
        body = (
            b'{"n":%d,"usage":{"prompt_tokens":2,"completion_tokens":3}}' % line
            if 200 <= status < 300
            else b'{"error":{"message":"no"}}'
        )
        ok, record, used = answer_record(
            f'"{prefix}-{line}"'.encode(), UpstreamResponse(status, body, f"req-{line}"), 1.0
        )
        records.append(record)
        out += ok
        if used is not None:
            usage.add(used)
    answered = first + len(statuses)
    key = part_key(claim.batch_id, claim.idx, claim.token, seq)
    await blobs.put(key, b"".join(records))
    await queue.checkpoint(
        claim,
        done=((1 << answered) - 1).to_bytes((claim.span.count + 7) // 8, "little"),
        part=Part(claim.batch_id, claim.idx, seq, key, out, len(records) - out),
        usage=usage,
        shard_done=answered == claim.span.count,
    )
    return records


class InMemory:
    """The file, batch and result services on one in-memory store and local blobs under
    ``tmp``, wired as ``api/app.py`` wires them; a deployment of :data:`MODEL`, shards of 2
    lines, ``limits`` (a dict of ``[limits]``) as given."""

    def __init__(self, tmp: Path, **limits: Any) -> None:
        self.tmp = tmp
        self.store = memory_store()
        self.blobs = LocalBlobs(tmp / "files")
        self.settings = Settings(
            data_dir=tmp,
            deployments=[DEPLOYMENT],
            engine=EngineSettings(shard_lines=2),
            limits=Limits(**limits),
        )
        self.files = FileService(self.settings, self.store.files, self.blobs)
        activator = Activator(self.settings, self.store.files, self.store.batches)
        self.batches = BatchService(self.settings, self.store.batches, self.store.files, activator)
        self.results = ResultService(
            self.store.batches, self.store.queue, self.blobs, keepalive_seconds=3600
        )

    async def upload(self, data: bytes, project: str = "p") -> FileRecord:
        """``data`` uploaded as a batch input file, as ``POST /v1/files`` does."""
        upload = self.files.begin_upload("in.jsonl")
        await upload.write(data)
        return await self.files.finish_upload(project, upload, purpose="batch", expires_after=None)

    async def create(self, data: bytes, project: str = "p") -> BatchRecord:
        """A batch of ``data`` for /v1/chat/completions, created (and so started)."""
        file = await self.upload(data, project)
        return await self.batches.create(
            project,
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )

    async def finalise(self, at: float) -> BatchRecord:
        """Finalise the batch that is ready at ``at`` (unix seconds), as an engine does; it
        as it ended."""
        ids = (new_id("file-"), new_id("file-"))
        leased = await self.store.queue.claim_finalize("finaliser", at, 60, ids)
        assert leased is not None
        await Finalizer(self.store.queue, self.blobs, self.tmp / "spool", "finaliser").finalize(
            leased
        )
        ended = await self.store.batches.get_batch(leased.id)
        assert ended is not None
        return ended
