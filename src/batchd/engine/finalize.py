"""Finalising a batch: concatenate its parts into the output and error files, write a
``batch_cancelled`` / ``batch_expired`` line for every request never executed, and end it.

Idempotent: the result files' ids are fixed when the batch is first leased for finalising,
their blobs are written whole under those ids, and the records are created in the same
transaction that ends the batch. A crash anywhere before that commit leaves the batch as it
was, to be finalised again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import anyio.to_thread
import msgspec
import orjson

from batchd.blobs.base import Blobs
from batchd.engine.journal import journal_dir
from batchd.engine.results import error_line
from batchd.models import (
    API_AZURE,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FILE_PROCESSED,
    PURPOSE_OUTPUT,
    BatchRecord,
    FileRecord,
    ShardSpan,
    now,
)
from batchd.store.protocols import QueueStore
from batchd.telemetry.logs import about

log = logging.getLogger(__name__)


class _Id(msgspec.Struct):
    custom_id: str


_id_decoder = msgspec.json.Decoder(_Id)

_MESSAGES = {
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "batch_expired": "This request could not be executed before the completion window expired.",
}


# Why a batch ended with requests never executed (their count fills in the %d).
_REASONS = {
    "batch_cancelled": " (%d never executed: cancelled)",
    "batch_expired": " (%d never executed: the completion window ended)",
}


def output_key(file_id: str) -> str:
    return f"outputs/{file_id}"


def unexecuted_lines(data: bytes, done: bytes, code: str) -> list[bytes]:
    """Error lines for the requests of a span whose done-bit is unset."""
    lines: list[bytes] = []
    i = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        if not done[i >> 3] & (1 << (i & 7)):
            cid = orjson.dumps(_id_decoder.decode(raw).custom_id)
            lines.append(error_line(cid, code, _MESSAGES[code]))
        i += 1
    return lines


class Finalizer:
    def __init__(self, store: QueueStore, blobs: Blobs, spool: Path, owner: str) -> None:
        self._store = store
        self._blobs = blobs
        self._spool = spool
        self._owner = owner

    async def _unexecuted(
        self, batch: BatchRecord, shards: list[tuple[int, ShardSpan, bytes]], code: str
    ) -> tuple[str | None, int]:
        key = f"parts/{batch.id}/unexecuted.err"
        count = 0
        async with self._blobs.writer(key) as w:
            for _idx, span, done in shards:
                if int.from_bytes(done, "little").bit_count() == span.count:
                    continue
                data = await self._blobs.read_all(batch.input_blob_key, span.start, span.end)
                lines = await anyio.to_thread.run_sync(unexecuted_lines, data, done, code)
                count += len(lines)
                await w.write(b"".join(lines))
            if not count:
                return None, 0
            await w.commit()
        return key, count

    async def finalize(self, batch: BatchRecord) -> None:
        shards = await self._store.batch_shards(batch.id)
        all_done = all(
            int.from_bytes(done, "little").bit_count() == span.count for _, span, done in shards
        )
        if batch.status == CANCELLING:
            status, code = CANCELLED, "batch_cancelled"
        elif all_done:
            status, code = COMPLETED, "batch_expired"
            await self._store.mark_finalizing(batch.id, self._owner, now())
            log.info("batch %s finalizing: every request is done", batch.id, extra=about(batch))
        else:
            status, code = EXPIRED, "batch_expired"
        parts = await self._store.batch_parts(batch.id)
        unexec_key, unexec = (None, 0) if all_done else await self._unexecuted(batch, shards, code)
        out_keys = [p.out_key for p in parts if p.out_key]
        err_keys = [p.err_key for p in parts if p.err_key] + ([unexec_key] if unexec_key else [])
        out_lines = sum(p.out_lines for p in parts)
        err_lines = sum(p.err_lines for p in parts) + unexec
        out_file = await self._write(batch, batch.output_file_id, out_keys, out_lines, "output")
        err_file = await self._write(batch, batch.error_file_id, err_keys, err_lines, "error")
        ended = await self._store.complete_batch(
            batch.id,
            self._owner,
            status=status,
            at=now(),
            output_file=out_file,
            error_file=err_file,
            completed=out_lines,
            failed=err_lines,
        )
        if not ended:
            log.warning("batch %s: finalising lease lost to a worker", batch.id, extra=about(batch))
            return
        log.info(
            "batch %s (project %s) %s: %d ok, %d failed%s",
            batch.id,
            batch.project,
            status,
            out_lines,
            err_lines,
            _REASONS[code] % unexec if unexec else "",
            extra=about(batch),
        )
        await self._blobs.delete_many(out_keys + err_keys)
        await anyio.to_thread.run_sync(
            lambda: shutil.rmtree(journal_dir(self._spool, batch.id), ignore_errors=True)
        )

    async def _write(
        self, batch: BatchRecord, file_id: str | None, keys: list[str], lines: int, kind: str
    ) -> FileRecord | None:
        """The result file of ``kind``, or None: OpenAI creates no file that would be empty;
        Azure (a batch made on the ``/openai`` tree) always creates both."""
        if file_id is None or (not lines and batch.api != API_AZURE):
            return None
        key = output_key(file_id)
        size = await self._blobs.concat(key, keys)
        created = now()
        return FileRecord(
            id=file_id,
            project=batch.project,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose=PURPOSE_OUTPUT,
            bytes=size,
            created_at=created,
            status=FILE_PROCESSED,
            blob_key=key,
            expires_at=created + batch.output_expires_after if batch.output_expires_after else None,
        )
