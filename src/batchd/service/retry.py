"""Retrying a batch's failures: a new batch of the input lines whose requests failed.

"Failed" is every ``custom_id`` in the ended batch's error file: answers that were errors,
and requests never executed (``batch_cancelled``, ``batch_expired``). The new input keeps
those lines byte for byte, in their order, and is uploaded and validated like any file
(``<batch id>_retry.jsonl``); the new batch has the old one's endpoint, window and API
tree, and ``metadata.retry_of`` = the old batch's id. Both the input and the error file
are streamed: only the set of failed ids is held in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from batchd.blobs.base import Blobs
from batchd.errors import Conflict, InvalidRequest
from batchd.models import PURPOSE_BATCH, BatchRecord
from batchd.service.batches import BatchService
from batchd.service.files import VALIDATE_CHUNK, FileService

METADATA_KEY = "retry_of"


class _Id(msgspec.Struct):
    custom_id: object = None


_id = msgspec.json.Decoder(_Id)


def _custom_id(line: bytes) -> str | None:
    try:
        cid = _id.decode(line).custom_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return cid if isinstance(cid, str) else None


async def lines_of(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The non-blank lines of a byte stream, without their line ends."""
    rest = b""
    async for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for line in parts:
            if line.strip():
                yield line.rstrip(b"\r")
    if rest.strip():
        yield rest.rstrip(b"\r")


class RetryService:
    def __init__(self, files: FileService, batches: BatchService, blobs: Blobs) -> None:
        self._files = files
        self._batches = batches
        self._blobs = blobs

    async def failed_ids(self, project: str, batch: BatchRecord) -> set[str | None]:
        if batch.error_file_id is None:
            return set()
        rec = await self._files.get(project, batch.error_file_id)
        return {_custom_id(line) async for line in lines_of(self._blobs.read(rec.blob_key))}

    async def retry_failed(self, project: str, batch_id: str) -> BatchRecord:
        """The new batch. Raises NotFound (no such batch, or its files are gone), Conflict
        (it has not ended) or InvalidRequest (nothing failed)."""
        batch = await self._batches.get(project, batch_id)
        if not batch.ended:
            raise Conflict(
                f"Batch {batch_id} is still {batch.status}; retry it once it has ended.",
                code="batch_not_ended",
            )
        failed = await self.failed_ids(project, batch)
        failed.discard(None)
        if not failed:
            raise InvalidRequest(
                f"Batch {batch_id} has no failed requests to retry.", code="nothing_to_retry"
            )
        source = await self._files.get(project, batch.input_file_id)
        upload = self._files.begin_upload(f"{batch.id}_retry.jsonl")
        try:
            pending: list[bytes] = []
            size = 0
            async for line in lines_of(self._blobs.read(source.blob_key)):
                if _custom_id(line) in failed:
                    pending.append(line + b"\n")
                    size += len(line) + 1
                    if size >= VALIDATE_CHUNK:
                        await upload.write(b"".join(pending))
                        pending, size = [], 0
            if pending:
                await upload.write(b"".join(pending))
            rec = await self._files.finish_upload(
                project, upload, purpose=PURPOSE_BATCH, expires_after=None
            )
        except BaseException:
            await upload.writer.abort()
            raise
        return await self._batches.create(
            project,
            input_file_id=rec.id,
            endpoint=batch.wire_endpoint,
            completion_window=batch.completion_window,
            metadata={METADATA_KEY: batch.id},
            output_expires_after=(
                {"anchor": "created_at", "seconds": batch.output_expires_after}
                if batch.output_expires_after
                else None
            ),
            api=batch.api,
        )
