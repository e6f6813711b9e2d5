"""What the dashboard (``/ui``) shows and does, for one project or (without ``[auth]``) all.

``project`` is the signed-in key's project, or ``None`` for every project when auth is off;
an object of another project is "not found", exactly as on the API. Actions on an object
(cancel, retry, download) run as the project that owns it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio.to_thread
import orjson
from prometheus_client.core import Metric

from batchd.blobs.base import Blobs
from batchd.config import Deployment, Settings
from batchd.errors import BlobNotFound, InvalidRequest, NotFound
from batchd.models import PURPOSE_BATCH, BatchRecord, FileRecord, normalise_endpoint
from batchd.results.openai import openai_line
from batchd.service.batches import BatchService
from batchd.service.files import FileService, Upload
from batchd.service.results import ResultService
from batchd.service.retry import RetryService
from batchd.store.protocols import Store
from batchd.store.types import SlotUse
from batchd.telemetry.recent import Recent, RecentWindow, totals_from

ERROR_LINES = 20  # error-file lines shown on a batch's page
LATEST_RESULTS = 10  # the newest committed results shown on a batch's page
ANSWER_PARSE_BYTES = 1024 * 1024  # a longer answer is shown by its size, not parsed
ERROR_PEEK_BYTES = 256 * 1024  # read at most this much of the error file for them


@dataclass(frozen=True)
class ErrorLine:
    """A result line as shown (an error-file line, or one of the latest results)."""

    custom_id: str
    status: str  # the HTTP status, or the error code of a request never executed
    message: str  # the error's message, or the start of a succeeded answer's text
    ok: bool = False  # a succeeded result


@dataclass(frozen=True)
class BatchDetail:
    batch: BatchRecord
    error_lines: list[ErrorLine]
    more_errors: bool  # the error file has more lines than shown
    latest: list[ErrorLine]  # the newest committed results, newest first


@dataclass(frozen=True)
class DeploymentView:
    model: str
    backend: str
    target: str  # the upstream URL (no credentials) or the embedded model
    limit: int  # max_concurrency, or max_concurrency_cap when adaptive
    adaptive: bool  # max_concurrency = "auto"
    slots: SlotUse | None  # leases of the live engine processes (from the store)
    recent: Recent | None  # from this host's metrics


def error_line(raw: bytes) -> ErrorLine:
    """One result line (of an error or output file, or of the results stream), as shown:
    who, what status, why (or what the answer says)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ErrorLine("?", "?", raw[:200].decode("utf-8", "replace"))
    if not isinstance(obj, dict):
        return ErrorLine("?", "?", str(obj)[:200])
    cid = str(obj.get("custom_id"))
    response = obj.get("response")
    if isinstance(response, dict):
        body = response.get("body")
        status = response.get("status_code")
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        if message is None and isinstance(status, int) and 200 <= status < 300:
            return ErrorLine(cid, str(status), answer_text(body)[:500], ok=True)
        return ErrorLine(cid, str(status), str(message or body)[:500])
    err = obj.get("error")
    if isinstance(err, dict):
        return ErrorLine(cid, str(err.get("code")), str(err.get("message"))[:500])
    return ErrorLine(cid, "?", "")


def answer_text(body: Any) -> str:
    """What a succeeded answer says: a chat completion's message, a completion's text, a
    response's output text; an embedding by its size; anything else as JSON."""
    if isinstance(body, dict):
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            first = choices[0]
            message = first.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                return str(message["content"])
            if isinstance(first.get("text"), str):
                return str(first["text"])
        output = body.get("output")
        for item in output if isinstance(output, list) else ():
            content = item.get("content") if isinstance(item, dict) else None
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    return str(part["text"])
        data = body.get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict):
            vector = data[0].get("embedding")
            if isinstance(vector, list):
                return f"embedding of {len(vector)} dimensions ({len(data)} inputs)"
    return orjson.dumps(body).decode()[:500]


def public_target(d: Deployment) -> str:
    if d.backend == "local":
        return f"embedded model {d.local_model}"
    parts = urlsplit(d.base_url or "")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class DashboardService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: Blobs,
        *,
        files: FileService,
        batches: BatchService,
        retries: RetryService,
        results: ResultService,
        read_metrics: Callable[[], list[Metric]],
    ) -> None:
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._files = files
        self._batches = batches
        self._retries = retries
        self._results = results
        self._read_metrics = read_metrics
        self._window = RecentWindow()

    # -- batches ------------------------------------------------------------------------
    async def list_batches(
        self, project: str | None, *, status: str | None, limit: int, after: str | None
    ) -> tuple[list[BatchRecord], bool]:
        batches = self._store.batches
        rows = await batches.list_batches(project, limit=limit, after=after, status=status)
        return rows[:limit], len(rows) > limit

    async def _batch(self, project: str | None, batch_id: str) -> BatchRecord:
        rec = await self._store.batches.get_batch(batch_id, project)
        if rec is None:
            raise NotFound(f"No such Batch object: {batch_id}", code="batch_not_found")
        return rec

    async def batch(self, project: str | None, batch_id: str) -> BatchDetail:
        rec = await self._batch(project, batch_id)
        lines: list[ErrorLine] = []
        more = False
        if rec.ended and rec.error_file_id:
            file = await self._store.files.get_file(rec.error_file_id, rec.project)
            if file is not None and file.bytes:
                lines, more = await self._error_lines(file)
        return BatchDetail(rec, lines, more, await self._latest(rec))

    async def _latest(self, rec: BatchRecord) -> list[ErrorLine]:
        """The newest committed results, newest first, as shown (an answer over
        :data:`ANSWER_PARSE_BYTES` by its size); none once the batch's results are deleted."""
        shown = []
        try:
            latest = await self._results.latest(rec, LATEST_RESULTS)
        except BlobNotFound:  # the batch's results were deleted meanwhile
            return []
        for pos, record in latest:
            if len(record.body) > ANSWER_PARSE_BYTES:
                status = str(record.status_code)
                text = f"({len(record.body)} bytes)"
                shown.append(ErrorLine(str(record.custom_id), status, text, record.succeeded))
            else:
                shown.append(error_line(openai_line(rec.id, pos, record)))
        return shown

    async def _error_lines(self, file: FileRecord) -> tuple[list[ErrorLine], bool]:
        try:
            head = await self._blobs.read_all(file.blob_key, 0, min(file.bytes, ERROR_PEEK_BYTES))
        except BlobNotFound:
            return [], False
        raw = head.split(b"\n")
        if file.bytes > len(head):
            raw.pop()  # cut short: its last line may be partial
        raw = [r for r in raw if r.strip()]
        more = len(raw) > ERROR_LINES or file.bytes > len(head)
        return [error_line(r) for r in raw[:ERROR_LINES]], more

    async def cancel(self, project: str | None, batch_id: str) -> BatchRecord:
        rec = await self._batch(project, batch_id)
        return await self._batches.cancel(rec.project, batch_id)

    async def retry(self, project: str | None, batch_id: str) -> BatchRecord:
        rec = await self._batch(project, batch_id)
        return await self._retries.retry_failed(rec.project, batch_id)

    # -- files --------------------------------------------------------------------------------
    async def list_files(
        self, project: str | None, *, limit: int, after: str | None
    ) -> tuple[list[FileRecord], bool]:
        rows = await self._store.files.list_files(
            project, purpose=None, limit=limit, after=after, order="desc"
        )
        return rows[:limit], len(rows) > limit

    async def download(
        self, project: str | None, file_id: str
    ) -> tuple[FileRecord, AsyncIterator[bytes]]:
        rec = await self._store.files.get_file(file_id, project)
        if rec is None:
            raise NotFound(f"No such File object: {file_id}", code="file_not_found")
        return await self._files.content(rec.project, file_id)

    async def upload_batch_input(
        self,
        project: str,
        upload: Upload,
        *,
        create_batch: bool,
        endpoint: str | None,
        completion_window: str,
    ) -> tuple[FileRecord, BatchRecord | None]:
        """Store an uploaded JSONL (purpose ``batch``) and, if asked, create a batch of it.
        ``endpoint`` None: the url of its lines. The caller aborts the upload on error."""
        rec = await self._files.finish_upload(
            project, upload, purpose=PURPOSE_BATCH, expires_after=None
        )
        if not create_batch:
            return rec, None
        if not endpoint:
            urls = rec.summary.urls if rec.summary is not None else {}
            endpoint = next((u for u in urls if normalise_endpoint(u)), None)
            if endpoint is None:
                raise InvalidRequest(
                    "No line names a supported url: choose the endpoint.",
                    code="missing_required_parameter",
                    param="endpoint",
                )
        batch = await self._batches.create(
            project, input_file_id=rec.id, endpoint=endpoint, completion_window=completion_window
        )
        return rec, batch

    # -- deployments -------------------------------------------------------------------
    async def deployments(self) -> list[DeploymentView]:
        state = await self._store.queue.queue_state(time.time())
        metrics = await anyio.to_thread.run_sync(self._read_metrics)
        recent = self._window.update(time.time(), totals_from(metrics))
        return [
            DeploymentView(
                model=d.model,
                backend=d.backend,
                target=public_target(d),
                limit=d.concurrency_limit,
                adaptive=d.adaptive,
                slots=state.slots.get(d.model),
                recent=recent.get(d.model),
            )
            for d in self._settings.effective_deployments()
        ]

    def describe(self) -> dict[str, Any]:
        """Settings the pages show (choices of the upload form)."""
        return {"completion_windows": list(self._settings.limits.completion_windows)}
