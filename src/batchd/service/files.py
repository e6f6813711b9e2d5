"""Files: upload (streamed), validation, listing, content and deletion."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from batchd.blobs.base import Blobs, BlobWriter
from batchd.blobs.keys import input_key
from batchd.config import Settings
from batchd.errors import (
    BlobNotFound,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    TooLarge,
    excerpt,
)
from batchd.models import (
    FILE_ERROR,
    FILE_PROCESSED,
    PURPOSE_BATCH,
    FileRecord,
    FileSummary,
    ValidationIssue,
    new_id,
    now,
)
from batchd.service.validation import MAX_ISSUES, Validator
from batchd.store.protocols import FileStore
from batchd.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

PURPOSES = ("batch", "fine-tune", "assistants", "vision", "user_data", "evals")
DEFAULT_INPUT_EXPIRY = 30 * 86400
VALIDATE_CHUNK = 1024 * 1024


MAX_FILENAME = 255
MAX_EXTENSION = 16


def clean_filename(name: str | None) -> str:
    """A user's file name as a name only: no directories, no control characters, at most
    :data:`MAX_FILENAME` characters. A longer name is cut before its extension, so that a
    ``.jsonl`` stays a ``.jsonl``."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if len(base) > MAX_FILENAME:
        stem, dot, ext = base.rpartition(".")
        if dot and stem and len(ext) < MAX_EXTENSION:
            base = stem[: MAX_FILENAME - len(ext) - 1] + "." + ext
        else:
            base = base[:MAX_FILENAME]
    return base or "upload.jsonl"


def file_error(summary: FileSummary) -> ValidationIssue | None:
    """Why a batch input is not usable at all (not JSONL, or no request in it), if it is not."""
    fatal = ("invalid_json_line", "empty_file")
    return next((i for i in summary.issues if i.code in fatal), None)


def status_details(summary: FileSummary, fatal: ValidationIssue | None) -> str | None:
    """Why a file is not usable (``fatal``), or what a batch on it will report, and where:
    "Line 2 is not valid JSON: ... (3 problems, on lines 2, 4, 6)". None for a clean file."""
    issues = summary.issues
    if not issues:
        return None
    first = fatal or issues[0]
    if len(issues) == 1:
        return first.message
    count = f"{len(issues)} or more" if len(issues) >= MAX_ISSUES else str(len(issues))
    lines = sorted({i.line for i in issues if i.line is not None})
    where = ", ".join(str(n) for n in lines[:10]) + (", ..." if len(lines) > 10 else "")
    return f"{first.message} ({count} problems{', on lines ' + where if lines else ''})"


@dataclass(slots=True)
class Upload:
    """An upload in progress: the bytes are gathered a megabyte at a time, then go to the
    blob store and through the validator on a worker thread (the same buffer, not copied
    for either), so a file is checked by the time its last byte is stored (one streamed
    pass, no second read)."""

    file_id: str
    filename: str
    writer: BlobWriter
    max_bytes: int
    validator: Validator
    # sha256 of the content, streamed (only for an upload with an Idempotency-Key)
    hasher: Any = None
    _pending: list[bytes] = field(default_factory=list)
    _pending_bytes: int = 0

    async def write(self, chunk: bytes) -> None:
        if self.writer.written + self._pending_bytes + len(chunk) > self.max_bytes:
            raise TooLarge(
                f"File is larger than the limit of {self.max_bytes} bytes.",
                code="file_too_large",
                param="file",
            )
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self.hasher is not None:
            self.hasher.update(chunk)
        if self._pending_bytes >= VALIDATE_CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        await self.writer.write(data)
        await anyio.to_thread.run_sync(self.validator.feed, data)

    def content_sha256(self) -> str:
        """The hex sha256 of every byte written (an upload begun with ``hashed=True``)."""
        assert self.hasher is not None, "begin_upload(hashed=True) computes the hash"
        return str(self.hasher.hexdigest())

    async def summary(self) -> FileSummary:
        await self._flush()
        return await anyio.to_thread.run_sync(self.validator.finish)

    async def commit(self) -> int:
        """Store what is pending and commit the blob; its size."""
        await self._flush()
        return await self.writer.commit()


def _too_many_files(max_files: int) -> InvalidRequest:
    return InvalidRequest(
        f"This project has reached its limit of {max_files} files (result files included); "
        "delete some first.",
        code="quota_exceeded",
        param="file",
    )


class FileService:
    def __init__(
        self, settings: Settings, files: FileStore, blobs: Blobs, metrics: Metrics | None = None
    ) -> None:
        self._settings = settings
        self._store = files
        self._blobs = blobs
        self._metrics = metrics

    @property
    def blobs(self) -> Blobs:
        """Where file bytes (and every other blob) are stored."""
        return self._blobs

    @property
    def max_file_bytes(self) -> int:
        """The largest file an upload may store (``limits.max_file_bytes``)."""
        return self._settings.limits.max_file_bytes

    # -- upload ---------------------------------------------------------------------
    def begin_upload(self, filename: str | None, *, hashed: bool = False) -> Upload:
        name = clean_filename(filename)
        file_id = new_id("file-")
        limits = self._settings.limits
        validator = Validator(
            max_lines=limits.max_requests_per_file,
            max_line_bytes=limits.max_line_bytes,
            shard_lines=self._settings.engine.shard_lines,
        )
        return Upload(
            file_id,
            name,
            self._blobs.writer(input_key(file_id)),
            limits.max_file_bytes,
            validator,
            hashlib.sha256() if hashed else None,
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
                f"Invalid purpose {excerpt(purpose)}; expected one of {', '.join(PURPOSES)}.",
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
        max_files = self._settings.limits.max_files
        if await self._store.count_files(project) >= max_files:
            raise _too_many_files(max_files)  # early: before the bytes are committed
        summary = await upload.summary() if purpose == PURPOSE_BATCH else None
        size = await upload.commit()
        created = now()
        if expires_after is None and purpose == PURPOSE_BATCH:
            expires_after = DEFAULT_INPUT_EXPIRY
        fatal = file_error(summary) if summary is not None else None
        rec = FileRecord(
            id=upload.file_id,
            project=project,
            filename=upload.filename,
            purpose=purpose,
            bytes=size,
            created_at=created,
            status=FILE_ERROR if fatal else FILE_PROCESSED,
            blob_key=input_key(upload.file_id),
            expires_at=created + expires_after if expires_after else None,
            status_details=status_details(summary, fatal) if summary else None,
            summary=summary,
        )
        try:
            # The count that holds under concurrency: checked and taken in one transaction.
            await self._store.insert_file(rec, max_files=max_files)
        except BaseException as exc:
            await asyncio.shield(self._blobs.delete(rec.blob_key))
            if isinstance(exc, QuotaExceeded):
                raise _too_many_files(max_files) from None
            raise
        if summary is not None:
            log.info("file %s: %s, %d lines", rec.id, rec.status, summary.lines)
        if self._metrics is not None:
            self._metrics.uploaded(purpose, size, summary)
        return rec

    # -- reads ----------------------------------------------------------------------------
    async def get(self, project: str, file_id: str) -> FileRecord:
        rec = await self._store.get_file(file_id, project)
        if rec is None:
            raise NotFound(
                f"No such File object: {excerpt(file_id, quote=False)}",
                code="file_not_found",
                param="file_id",
            )
        return rec

    async def list(
        self, project: str, *, purpose: str | None, limit: int, after: str | None, order: str
    ) -> tuple[list[FileRecord], bool]:
        rows = await self._store.list_files(
            project, purpose=purpose, limit=limit, after=after, order=order
        )
        return rows[:limit], len(rows) > limit

    async def stat_content(self, project: str, file_id: str) -> FileRecord:
        """The file, once its bytes are known to exist (404 otherwise)."""
        rec = await self.get(project, file_id)
        try:
            await self._blobs.size(rec.blob_key)
        except BlobNotFound:
            raise NotFound(
                f"No content for file {excerpt(file_id, quote=False)}", code="file_not_found"
            ) from None
        return rec

    async def content(
        self, project: str, file_id: str, start: int = 0, end: int | None = None
    ) -> tuple[FileRecord, AsyncIterator[bytes]]:
        rec = await self.stat_content(project, file_id)
        return rec, self._blobs.read(rec.blob_key, start, end)

    async def delete(self, project: str, file_id: str) -> None:
        rec = await self._store.mark_file_deleted(file_id, project, now())
        if rec is None:
            raise NotFound(
                f"No such File object: {excerpt(file_id, quote=False)}",
                code="file_not_found",
                param="file_id",
            )
        await self.collect_if_unused(rec)

    async def collect_if_unused(self, rec: FileRecord) -> None:
        """Remove a deleted file's bytes and record unless a running batch still reads them."""
        if await self._store.blob_in_use(rec.blob_key):
            return
        await self._blobs.delete(rec.blob_key)
        await self._store.purge_file(rec.id)
