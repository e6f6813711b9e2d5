"""Files: upload (streamed), validation, listing, content and deletion."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio.to_thread

from batchd.blobs.base import Blobs, BlobWriter
from batchd.config import Settings
from batchd.errors import BlobNotFound, InvalidRequest, NotFound, TooLarge
from batchd.models import (
    FILE_ERROR,
    FILE_PROCESSED,
    FILE_UPLOADED,
    PURPOSE_BATCH,
    FileRecord,
    FileSummary,
    ValidationIssue,
    new_id,
    now,
)
from batchd.service.activation import Activator
from batchd.service.validation import Validator
from batchd.store.sql import Store

log = logging.getLogger(__name__)

PURPOSES = ("batch", "fine-tune", "assistants", "vision", "user_data", "evals")
DEFAULT_INPUT_EXPIRY = 30 * 86400
VALIDATION_LEASE = 60.0


def input_key(file_id: str) -> str:
    return f"inputs/{file_id}"


def clean_filename(name: str | None) -> str:
    """A user's file name as a name only: no directories, no control characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] or "upload.jsonl"


def file_error(summary: FileSummary) -> ValidationIssue | None:
    """Why a batch input is not usable at all (not JSONL, or no request in it), if it is not."""
    fatal = ("invalid_json_line", "empty_file")
    return next((i for i in summary.issues if i.code in fatal), None)


@dataclass(slots=True)
class Upload:
    """An upload in progress: the bytes go to the blob store as they arrive."""

    file_id: str
    filename: str
    writer: BlobWriter
    max_bytes: int

    async def write(self, chunk: bytes) -> None:
        if self.writer.written + len(chunk) > self.max_bytes:
            raise TooLarge(
                f"File is larger than the limit of {self.max_bytes} bytes.",
                code="file_too_large",
                param="file",
            )
        await self.writer.write(chunk)


class FileService:
    def __init__(
        self, settings: Settings, store: Store, blobs: Blobs, activator: Activator, owner: str
    ) -> None:
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._activator = activator
        self._owner = owner

    # -- upload ---------------------------------------------------------------------
    def begin_upload(self, filename: str | None) -> Upload:
        name = clean_filename(filename)
        file_id = new_id("file-")
        return Upload(
            file_id,
            name,
            self._blobs.writer(input_key(file_id)),
            self._settings.limits.max_file_bytes,
        )

    async def finish_upload(
        self,
        project: str,
        upload: Upload,
        *,
        purpose: str,
        expires_after: int | None,
    ) -> FileRecord:
        """Check the form's fields, commit the bytes and record the file. The caller aborts
        the upload when this raises."""
        if purpose not in PURPOSES:
            raise InvalidRequest(
                f"Invalid purpose {purpose!r}; expected one of {', '.join(PURPOSES)}.",
                code="invalid_value",
                param="purpose",
            )
        if purpose == PURPOSE_BATCH and not upload.filename.lower().endswith(".jsonl"):
            raise InvalidRequest(
                "A file with purpose 'batch' must be a .jsonl file.",
                code="invalid_file_format",
                param="file",
            )
        if expires_after is not None and not 3600 <= expires_after <= 30 * 86400:
            raise InvalidRequest(
                "expires_after[seconds] must be between 3600 and 2592000.",
                code="invalid_value",
                param="expires_after",
            )
        if await self._store.count_files(project) >= self._settings.limits.max_files:
            raise InvalidRequest(
                f"This project has reached its limit of {self._settings.limits.max_files} files; "
                "delete some first.",
                code="quota_exceeded",
                param="file",
            )
        size = await upload.writer.commit()
        created = now()
        if expires_after is None and purpose == PURPOSE_BATCH:
            expires_after = DEFAULT_INPUT_EXPIRY
        is_batch = purpose == PURPOSE_BATCH
        rec = FileRecord(
            id=upload.file_id,
            project=project,
            filename=upload.filename,
            purpose=purpose,
            bytes=size,
            created_at=created,
            status=FILE_UPLOADED if is_batch else FILE_PROCESSED,
            blob_key=input_key(upload.file_id),
            expires_at=created + expires_after if expires_after else None,
        )
        await self._store.insert_file(
            rec,
            validate_owner=self._owner if is_batch else None,
            validate_until=time.time() + VALIDATION_LEASE if is_batch else None,
        )
        return rec

    # -- validation -----------------------------------------------------------------------
    async def validate(self, rec: FileRecord) -> FileSummary:
        """Stream the stored file once through the validator, record the result and start
        the batches that were waiting for it."""
        limits = self._settings.limits
        validator = Validator(
            max_lines=limits.max_requests_per_file,
            max_line_bytes=limits.max_line_bytes,
            shard_lines=self._settings.engine.shard_lines,
        )
        renew_at = time.monotonic() + VALIDATION_LEASE / 3
        async for chunk in self._blobs.read(rec.blob_key):
            await anyio.to_thread.run_sync(validator.feed, chunk)
            if time.monotonic() > renew_at:
                renew_at = time.monotonic() + VALIDATION_LEASE / 3
                await self._store.renew_validation(
                    rec.id, self._owner, time.time() + VALIDATION_LEASE
                )
        summary = await anyio.to_thread.run_sync(validator.finish)
        status, details = FILE_PROCESSED, None
        fatal = file_error(summary)
        if fatal is not None:
            status, details = FILE_ERROR, fatal.message
        await self._store.finish_validation(rec.id, status=status, details=details, summary=summary)
        log.info("file %s validated: %s, %d lines", rec.id, status, summary.lines)
        for batch in await self._store.validating_batches(rec.id):
            await self._activator.activate(batch)
        return summary

    async def validate_safely(self, rec: FileRecord) -> None:
        """Validation as a background task: a failure is logged, and another process takes
        the file over when this one's lease lapses."""
        try:
            await self.validate(rec)
        except Exception:
            log.exception("validating file %s failed; it will be retried", rec.id)

    # -- reads ----------------------------------------------------------------------------
    async def get(self, project: str, file_id: str) -> FileRecord:
        rec = await self._store.get_file(file_id, project)
        if rec is None:
            raise NotFound(
                f"No such File object: {file_id}", code="file_not_found", param="file_id"
            )
        return rec

    async def list(
        self, project: str, *, purpose: str | None, limit: int, after: str | None, order: str
    ) -> tuple[list[FileRecord], bool]:
        rows = await self._store.list_files(
            project, purpose=purpose, limit=limit, after=after, order=order
        )
        return rows[:limit], len(rows) > limit

    async def content(
        self, project: str, file_id: str, start: int = 0, end: int | None = None
    ) -> tuple[FileRecord, AsyncIterator[bytes]]:
        rec = await self.get(project, file_id)
        try:
            await self._blobs.size(rec.blob_key)
        except BlobNotFound:
            raise NotFound(f"No content for file {file_id}", code="file_not_found") from None
        return rec, self._blobs.read(rec.blob_key, start, end)

    async def delete(self, project: str, file_id: str) -> None:
        rec = await self._store.mark_file_deleted(file_id, project, now())
        if rec is None:
            raise NotFound(
                f"No such File object: {file_id}", code="file_not_found", param="file_id"
            )
        await self.collect_if_unused(rec)

    async def collect_if_unused(self, rec: FileRecord) -> None:
        """Remove a deleted file's bytes and record unless a running batch still reads them."""
        if await self._store.blob_in_use(rec.blob_key):
            return
        await self._blobs.delete(rec.blob_key)
        await self._store.purge_file(rec.id)
