"""Anthropic's Message Batches: create, read, list, cancel, delete and results.

A message batch is an adapter over one ordinary batch of the project: its inline requests are
checked, translated to chat completions (``service/messages_format.py``) or, when the model's
deployment speaks ``/v1/messages`` itself (``api_style = "anthropic"``), kept as they are
(endpoint ``/v1/messages``), and stored as the batch's input file (``msgbatch_ID.jsonl``,
purpose ``batch``), and the batch is created through
:class:`BatchService`, so the same engine, deployments, quotas, fair shares and limits apply.
The message batch's id is the batch's with the prefix ``msgbatch_`` instead of ``batch_``.
Results are rendered at read time from the batch's result records
(:func:`batchd.results.reader.read_results`, in the order they were committed), one Anthropic
result line per record (:mod:`batchd.results.anthropic`). Limits (Anthropic's):
``anthropic.max_requests`` requests (100,000), ``anthropic.max_batch_bytes`` of create body
(256 MB), results readable for
``anthropic.results_retention_seconds`` after creation (29 days), then archived.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from batchd.config import Settings
from batchd.errors import ApiError, Conflict, InvalidRequest, NotFound, TooLarge, excerpt
from batchd.models import (
    API_ANTHROPIC,
    CANCELLING,
    CHAT_COMPLETIONS,
    FAILED,
    MESSAGES_ENDPOINT,
    PURPOSE_BATCH,
    BatchRecord,
    ValidationIssue,
    now,
)
from batchd.results.anthropic import anthropic_line, errored
from batchd.results.reader import read_results
from batchd.results.record import CANCELLED, EXPIRED, Record, line_id
from batchd.service.batches import BatchService
from batchd.service.files import FileService
from batchd.service.messages_format import chat_body, messages_body
from batchd.store.protocols import MessageBatchRecords, QueueStore
from batchd.store.types import MessageBatchRow

PREFIX = "msgbatch_"
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}", re.ASCII)
_WRITE_CHUNK = 1024 * 1024
# request_counts of the records that did not succeed (any other outcome is ``errored``)
_COUNTED = {CANCELLED: "canceled", EXPIRED: "expired"}


def batch_id_of(mb_id: str) -> str:
    return "batch_" + mb_id.removeprefix(PREFIX)


def rfc3339(ts: int | None) -> str | None:
    """Unix seconds as an RFC 3339 UTC time (``2026-12-01T10:00:00Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def ended_at(rec: BatchRecord) -> int | None:
    return rec.completed_at or rec.cancelled_at or rec.expired_at or rec.failed_at


def _not_found(mb_id: str) -> NotFound:
    return NotFound(
        f"No such message batch: {excerpt(mb_id, quote=False)}",
        code="not_found",
        param="message_batch_id",
    )


def _model_of(item: Any) -> str | None:
    params = item.get("params") if isinstance(item, dict) else None
    model = params.get("model") if isinstance(params, dict) else None
    return model if isinstance(model, str) else None


def _as_request_error(issue: ValidationIssue) -> InvalidRequest:
    """A problem the activation found on line N of the batch input, named as the create
    body's field: ``requests.<N-1>.params.<field>`` (the input line N is request N-1; its
    ``body.<field>`` is the request's ``params.<field>``)."""
    message = issue.message
    if issue.line is None:
        return InvalidRequest(message, code=issue.code)
    where = f"requests.{issue.line - 1}"
    if issue.param is not None and issue.param.startswith("body."):
        where += ".params." + issue.param.removeprefix("body.")
    message = re.sub(r"^Line \d+: ", "", message)
    return InvalidRequest(f"{where}: {message}", code=issue.code, param=where)


def jsonl_of(
    requests: Any, max_requests: int, speaks_messages: Callable[[str], bool]
) -> tuple[bytes, str, str]:
    """The batch input for a create body's ``requests``, the one model it uses and the batch
    endpoint: the params as they are (``/v1/messages``) when ``speaks_messages(model)`` (its
    deployment has ``api_style = "anthropic"``), else translated to chat completions. Raises
    :class:`InvalidRequest` naming ``requests.N.<field>``."""
    if not isinstance(requests, list) or not requests:
        raise InvalidRequest("requests: expected a non-empty list.", param="requests")
    if len(requests) > max_requests:
        raise InvalidRequest(
            f"requests: {len(requests)} requests; at most {max_requests} per batch.",
            param="requests",
        )
    first = _model_of(requests[0])
    passthrough = first is not None and speaks_messages(first)
    to_body = messages_body if passthrough else chat_body
    url = MESSAGES_ENDPOINT if passthrough else CHAT_COMPLETIONS
    seen: set[str] = set()
    models: set[str] = set()
    lines = []
    for i, item in enumerate(requests):
        where = f"requests.{i}"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: expected {{custom_id, params}}.", param=where)
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
            raise InvalidRequest(
                f"{where}.custom_id: 1 to 64 letters, digits, '_' or '-'.",
                param=f"{where}.custom_id",
            )
        if custom_id in seen:
            raise InvalidRequest(
                f"{where}.custom_id: {custom_id!r} is used more than once.",
                param=f"{where}.custom_id",
            )
        seen.add(custom_id)
        try:
            body = to_body(item.get("params"))
        except InvalidRequest as exc:
            field = f"{where}.params.{exc.param}" if exc.param != "params" else f"{where}.params"
            raise InvalidRequest(f"{where}.params.{exc.message}", param=field) from None
        models.add(body["model"])
        line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
        lines.append(orjson.dumps(line))
    if len(models) > 1:
        raise InvalidRequest(
            f"requests use {len(models)} models; batchd runs one model per message batch.",
            param="requests",
        )
    return b"\n".join(lines) + b"\n", models.pop(), url


class MessageBatchService:
    def __init__(
        self,
        settings: Settings,
        files: FileService,
        batches: BatchService,
        store: MessageBatchRecords,
        results: QueueStore,
    ) -> None:
        """``store``: the message batch rows; ``results``: the queue their batches' committed
        results are read from."""
        self._settings = settings.anthropic
        self._deployments = settings
        self._files = files
        self._batches = batches
        self._store = store
        self._results = results

    def _speaks_messages(self, model: str) -> bool:
        """The model's deployment speaks ``/v1/messages`` (``api_style = "anthropic"``)."""
        deployment = self._deployments.deployment_for(model)
        return deployment is not None and deployment.speaks_messages

    @property
    def max_body_bytes(self) -> int:
        return self._settings.max_batch_bytes

    # -- create --------------------------------------------------------------------
    async def create(self, project: str, requests: Any) -> tuple[MessageBatchRow, BatchRecord]:
        """Check and translate the requests, store them as a batch input, create the batch.
        A batch whose input the engine refuses (no deployment serves the model, a quota) is
        a 400 naming the first problem, and nothing of it stays listed."""
        data, _, endpoint = jsonl_of(requests, self._settings.max_requests, self._speaks_messages)
        retention = self._settings.results_retention_seconds
        upload = self._files.begin_upload("message_batch.jsonl")
        try:
            for start in range(0, len(data), _WRITE_CHUNK):
                await upload.write(data[start : start + _WRITE_CHUNK])
            file = await self._files.finish_upload(
                project, upload, purpose=PURPOSE_BATCH, expires_after=retention
            )
        except TooLarge:
            await upload.writer.abort()
            raise TooLarge(
                f"The translated requests are larger than limits.max_file_bytes "
                f"({self._files.max_file_bytes} bytes).",
                code="request_too_large",
            ) from None
        except BaseException:
            await upload.writer.abort()
            raise
        try:
            rec = await self._batches.create(
                project,
                input_file_id=file.id,
                endpoint=endpoint,
                completion_window="24h",
                output_expires_after={"anchor": "created_at", "seconds": retention},
                api=API_ANTHROPIC,
            )
        except ApiError:
            await self._files.delete(project, file.id)
            raise
        if rec.status == FAILED:
            await self._files.delete(project, file.id)
            if not rec.errors:
                raise InvalidRequest("The batch could not start.")
            raise _as_request_error(rec.errors[0])
        row = MessageBatchRow(
            id=PREFIX + rec.id.removeprefix("batch_"),
            project=project,
            batch_id=rec.id,
            created_at=rec.created_at,
        )
        await self._store.insert(row)
        return row, rec

    # -- read ----------------------------------------------------------------------
    async def get(self, project: str, mb_id: str) -> tuple[MessageBatchRow, BatchRecord]:
        found = await self._store.get(project, mb_id) if mb_id.startswith(PREFIX) else None
        if found is None:
            raise _not_found(mb_id)
        return found

    async def list(
        self, project: str, *, limit: int, after: str | None, before: str | None
    ) -> tuple[list[tuple[MessageBatchRow, BatchRecord]], bool]:
        return await self._store.list(project, limit=limit, after=after, before=before)

    async def cancel(self, project: str, mb_id: str) -> tuple[MessageBatchRow, BatchRecord]:
        row, _ = await self.get(project, mb_id)
        try:
            rec = await self._batches.cancel(project, row.batch_id)
        except Conflict as exc:  # in Anthropic's words: its statuses are not OpenAI's
            raise Conflict(
                f"Message batch {excerpt(mb_id, quote=False)} has ended: it can no longer be "
                "canceled.",
                code=exc.code,
            ) from None
        return row, rec

    async def delete(self, project: str, mb_id: str) -> None:
        """Delete an ended message batch and its files (input, output, error)."""
        _, rec = await self.get(project, mb_id)
        if not rec.ended:
            raise InvalidRequest(
                "A message batch can be deleted once it has ended; cancel it first.",
                code="batch_not_ended",
            )
        if not await self._store.mark_deleted(project, mb_id, now()):
            raise _not_found(mb_id)
        for file_id in (rec.input_file_id, rec.output_file_id, rec.error_file_id):
            if file_id is not None:
                try:
                    await self._files.delete(project, file_id)
                except NotFound:
                    pass  # deleted by its owner already, or never made

    # -- the wire shape ------------------------------------------------------------
    def archived_at(self, rec: BatchRecord) -> int | None:
        at = rec.created_at + self._settings.results_retention_seconds
        return at if rec.ended and now() >= at else None

    async def counts(self, row: MessageBatchRow, rec: BatchRecord) -> dict[str, int]:
        """``request_counts``: live while it runs (``processing`` what has no result yet);
        once it ended, from its result files, counted once and kept."""
        if not rec.ended:
            done = rec.completed + rec.failed
            return {
                "processing": max(rec.total - done, 0),
                "succeeded": rec.completed,
                "errored": rec.failed,
                "canceled": 0,
                "expired": 0,
            }
        if row.counts is not None:
            return {"processing": 0, **row.counts}
        counts = {"succeeded": rec.completed, "errored": 0, "canceled": 0, "expired": 0}
        if rec.status == FAILED:
            # refused after the create answered (a token quota is counted then): every
            # request is errored, with the reason (see _render)
            async for _ in self._refused(row.project, rec):
                counts["errored"] += 1
        async for _, record in self._records(rec, "failed"):
            outcome = record.outcome
            counts[_COUNTED.get(outcome, "errored")] += 1
        await self._store.keep_counts(row.id, counts)
        return {"processing": 0, **counts}

    async def to_wire(
        self, row: MessageBatchRow, rec: BatchRecord, base_url: str
    ) -> dict[str, Any]:
        """The MessageBatch object (the ``anthropic`` SDK's ``MessageBatch``)."""
        archived = self.archived_at(rec)
        if rec.ended:
            status = "ended"
        elif rec.status == CANCELLING or rec.cancelling_at is not None:
            status = "canceling"
        else:
            status = "in_progress"
        results = None
        if rec.ended and archived is None:
            results = f"{base_url.rstrip('/')}/v1/messages/batches/{row.id}/results"
        return {
            "id": row.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": await self.counts(row, rec),
            "created_at": rfc3339(rec.created_at),
            "ended_at": rfc3339(ended_at(rec)),
            "expires_at": rfc3339(rec.expires_at),
            "cancel_initiated_at": rfc3339(rec.cancelling_at),
            "archived_at": rfc3339(archived),
            "results_url": results,
        }

    # -- results -------------------------------------------------------------------
    async def results(self, project: str, mb_id: str) -> AsyncIterator[bytes]:
        """The result lines (JSONL, the ``anthropic`` SDK's ``MessageBatchIndividualResponse``)
        of an ended, unarchived message batch, in the order they were committed."""
        row, rec = await self.get(project, mb_id)
        if not rec.ended:
            raise InvalidRequest(
                "The message batch is still processing: results exist once it has ended.",
                code="batch_not_ended",
            )
        if self.archived_at(rec) is not None:
            raise NotFound(
                f"The results of {row.id} are archived (kept "
                f"{self._settings.results_retention_seconds} seconds).",
                code="results_archived",
            )
        return self._render(project, rec)

    async def _render(self, project: str, rec: BatchRecord) -> AsyncIterator[bytes]:
        async for line in self._refused(project, rec):
            yield orjson.dumps(line) + b"\n"
        async for pos, record in self._records(rec):
            message_id = "msg_" + line_id(rec.id, pos).removeprefix("batch_req_")
            yield orjson.dumps(anthropic_line(record, rec.endpoint, message_id)) + b"\n"

    def _records(
        self, rec: BatchRecord, outcome: Literal["failed"] | None = None
    ) -> AsyncIterator[tuple[int, Record]]:
        return read_results(self._results, self._files.blobs, rec.id, outcome=outcome)

    async def _refused(self, project: str, rec: BatchRecord) -> AsyncIterator[dict[str, Any]]:
        """For a batch refused as a whole (``failed``: a token quota, say), an ``errored``
        result for each of its requests, with the reason."""
        if rec.status != FAILED:
            return
        why = rec.errors[0].message if rec.errors else "The batch could not start."
        async for line in self._lines(project, rec.input_file_id):
            if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                yield errored(line["custom_id"], 400, why)

    async def _lines(self, project: str, file_id: str | None) -> AsyncIterator[Any]:
        """The JSON lines of a file (none when there is no such file)."""
        if file_id is None:
            return
        try:
            _, chunks = await self._files.content(project, file_id)
        except NotFound:
            return
        rest = b""
        async for chunk in chunks:
            rest += chunk
            *whole, rest = rest.split(b"\n")
            for raw in whole:
                if raw.strip():
                    yield orjson.loads(raw)
        if rest.strip():
            yield orjson.loads(rest)
