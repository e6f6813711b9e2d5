"""Finalising a batch: commit a ``cancelled`` / ``expired`` record for every request never
executed as the batch's last part, render the output and error files from its parts in
position order, and end it.

Idempotent: the result files' ids are fixed when the batch is first leased for finalising,
the last part is committed once (a later attempt finds it), the files' blobs are written
whole under those ids from the same parts, and the file records are created in the same
transaction that ends the batch. A crash anywhere before that commit leaves the batch to be
finalised again. The parts stay: they are the batch's results store (the results stream, the
Anthropic results) until the retention sweep deletes them with the result files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from pathlib import Path

import anyio.to_thread
import msgspec
import orjson

from batchd.blobs.base import Blobs, BlobWriter
from batchd.blobs.keys import output_key, unexecuted_key
from batchd.engine.journal import journal_dir
from batchd.models import (
    API_AZURE,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FILE_PROCESSED,
    PURPOSE_OUTPUT,
    UNEXECUTED_SHARD,
    BatchRecord,
    FileRecord,
    Part,
    ShardSpan,
    now,
)
from batchd.results.openai import render_part
from batchd.results.reader import by_size
from batchd.results.record import Outcome, unanswered
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


_OUTCOMES: dict[str, Outcome] = {"batch_cancelled": "cancelled", "batch_expired": "expired"}


def unexecuted_records(data: bytes, done: bytes, code: str) -> list[bytes]:
    """Records (outcome ``cancelled`` or ``expired``, ``error.code`` ``code``) for the
    requests of a span whose done-bit is unset."""
    lines: list[bytes] = []
    i = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        if not done[i >> 3] & (1 << (i & 7)):
            cid = orjson.dumps(_id_decoder.decode(raw).custom_id)
            lines.append(unanswered(cid, code, _MESSAGES[code], outcome=_OUTCOMES[code]))
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
    ) -> Part | None:
        """The part of the requests never executed (written, not committed), or None."""
        key = unexecuted_key(batch.id)
        count = 0
        async with self._blobs.writer(key) as w:
            for _idx, span, done in shards:
                if int.from_bytes(done, "little").bit_count() == span.count:
                    continue
                data = await self._blobs.read_all(batch.input_blob_key, span.start, span.end)
                lines = await anyio.to_thread.run_sync(unexecuted_records, data, done, code)
                count += len(lines)
                await w.write(b"".join(lines))
            if not count:
                return None
            await w.commit()
        return Part(batch.id, UNEXECUTED_SHARD, 0, key, 0, count)

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
        parts = await self._store.result_parts(batch.id)
        if not all_done and not any(p.shard_idx == UNEXECUTED_SHARD for p in parts):
            last = await self._unexecuted(batch, shards, code)
            if last is not None:
                if not await self._store.commit_last_part(last, self._owner):
                    log.warning("batch %s: finalising lease lost", batch.id, extra=about(batch))
                    return
                parts = await self._store.result_parts(batch.id)
        unexec = sum(p.lines for p in parts if p.shard_idx == UNEXECUTED_SHARD)
        out_lines = sum(p.out_lines for p in parts)
        err_lines = sum(p.err_lines for p in parts)
        out_file, err_file = await self._write_files(batch, parts, out_lines, err_lines)
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
        await anyio.to_thread.run_sync(
            lambda: shutil.rmtree(journal_dir(self._spool, batch.id), ignore_errors=True)
        )

    def _file(self, batch: BatchRecord, file_id: str | None, lines: int) -> str | None:
        """The id of a result file to write, or None: OpenAI creates no file that would be
        empty; Azure (a batch made on the ``/openai`` tree) always creates both."""
        if file_id is None or (not lines and batch.api != API_AZURE):
            return None
        return file_id

    async def _write_files(
        self, batch: BatchRecord, parts: list[Part], out_lines: int, err_lines: int
    ) -> tuple[FileRecord | None, FileRecord | None]:
        """The output and error files, rendered from ``parts`` (in position order)."""
        out_id = self._file(batch, batch.output_file_id, out_lines)
        err_id = self._file(batch, batch.error_file_id, err_lines)
        if out_id is None and err_id is None:
            return None, None
        async with contextlib.AsyncExitStack() as stack:  # leaving uncommitted aborts
            out_w = await self._open(stack, out_id)
            err_w = await self._open(stack, err_id)
            for part in parts:
                data = await self._blobs.read_all(part.key)
                out, err, _, _ = await by_size(
                    data, functools.partial(render_part, batch.id, part.first_pos)
                )
                if out and out_w is not None:
                    await out_w.write(out)
                if err and err_w is not None:
                    await err_w.write(err)
            out_size = await out_w.commit() if out_w is not None else 0
            err_size = await err_w.commit() if err_w is not None else 0
        return (
            self._record(batch, out_id, out_size, "output"),
            self._record(batch, err_id, err_size, "error"),
        )

    async def _open(
        self, stack: contextlib.AsyncExitStack[bool | None], file_id: str | None
    ) -> BlobWriter | None:
        if file_id is None:
            return None
        return await stack.enter_async_context(self._blobs.writer(output_key(file_id)))

    @staticmethod
    def _record(
        batch: BatchRecord, file_id: str | None, size: int, kind: str
    ) -> FileRecord | None:
        if file_id is None:
            return None
        created = now()
        return FileRecord(
            id=file_id,
            project=batch.project,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose=PURPOSE_OUTPUT,
            bytes=size,
            created_at=created,
            status=FILE_PROCESSED,
            blob_key=output_key(file_id),
            expires_at=created + batch.output_expires_after if batch.output_expires_after else None,
        )
