"""Batches: create, read, list and cancel."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from batchd.config import Settings, parse_window
from batchd.errors import Conflict, InvalidRequest, NotFound, excerpt
from batchd.models import (
    API_ANTHROPIC,
    API_AZURE,
    API_OPENAI,
    CANCELLING,
    ENDPOINTS,
    MESSAGES_ENDPOINT,
    PURPOSE_BATCH,
    TERMINAL,
    VALIDATING,
    BatchRecord,
    new_id,
    normalise_endpoint,
    now,
)
from batchd.service.activation import Activator
from batchd.store.protocols import BatchStore, FileStore
from batchd.telemetry.logs import about

log = logging.getLogger(__name__)

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object.", code="invalid_type", param="metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"metadata has {len(metadata)} keys; at most {MAX_METADATA_PAIRS} are allowed.",
            code="invalid_value",
            param="metadata",
        )
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise InvalidRequest(
                f"metadata values must be strings ({excerpt(k)} is not).",
                code="invalid_type",
                param=f"metadata.{k[:MAX_METADATA_KEY]}",
            )
        if len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"metadata keys are at most {MAX_METADATA_KEY} characters and values at most "
                f"{MAX_METADATA_VALUE}.",
                code="invalid_value",
                param=f"metadata.{k[:MAX_METADATA_KEY]}",
            )
    return dict(metadata)


def check_output_expiry(value: Any) -> int | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or value.get("anchor") != "created_at"
        or not isinstance(value.get("seconds"), int)
        or not 3600 <= value["seconds"] <= 30 * 86400
    ):
        raise InvalidRequest(
            "output_expires_after must be {anchor: 'created_at', seconds: 3600..2592000}.",
            code="invalid_value",
            param="output_expires_after",
        )
    return int(value["seconds"])


class BatchService:
    def __init__(
        self, settings: Settings, batches: BatchStore, files: FileStore, activator: Activator
    ) -> None:
        self._settings = settings
        self._batches = batches
        self._files = files
        self._activator = activator

    async def create(
        self,
        project: str,
        *,
        input_file_id: Any,
        endpoint: Any,
        completion_window: Any,
        metadata: Any = None,
        output_expires_after: Any = None,
        api: str = API_OPENAI,
    ) -> BatchRecord:
        """Create a batch and start it (or fail it with every problem of its input).
        ``api``: the URL tree it was made on; ``API_AZURE`` echoes ``endpoint`` as sent and
        always gets both result files; only ``API_ANTHROPIC`` (a message batch) may name
        :data:`MESSAGES_ENDPOINT`."""
        if not isinstance(input_file_id, str) or not input_file_id:
            raise InvalidRequest(
                "input_file_id is required.",
                code="missing_required_parameter",
                param="input_file_id",
            )
        canonical = normalise_endpoint(endpoint) if isinstance(endpoint, str) else None
        if api == API_ANTHROPIC and endpoint == MESSAGES_ENDPOINT:
            canonical = MESSAGES_ENDPOINT  # a message batch for a /v1/messages deployment
        if canonical is None:
            raise InvalidRequest(
                f"Invalid endpoint {excerpt(endpoint)}; expected one of {', '.join(ENDPOINTS)}.",
                code="invalid_value",
                param="endpoint",
            )
        windows = self._settings.limits.completion_windows
        if completion_window not in windows:
            raise InvalidRequest(
                f"Invalid completion_window {excerpt(completion_window)}; expected one of "
                f"{', '.join(windows)}.",
                code="invalid_value",
                param="completion_window",
            )
        meta = check_metadata(metadata)
        out_expiry = check_output_expiry(output_expires_after)
        if out_expiry is None and self._settings.limits.output_retention:
            out_expiry = self._settings.limits.output_retention  # [limits] output_retention
        file = await self._files.get_file(input_file_id, project)
        if file is None:
            raise NotFound(
                f"No such File object: {excerpt(input_file_id, quote=False)}",
                code="file_not_found",
                param="input_file_id",
            )
        if file.purpose != PURPOSE_BATCH:
            raise InvalidRequest(
                f"File {excerpt(input_file_id, quote=False)} has purpose {file.purpose!r}; "
                "a batch needs 'batch'.",
                code="invalid_value",
                param="input_file_id",
            )
        # A file whose content failed the checks is accepted: the batch goes ``failed`` with
        # every bad line in ``errors.data`` (as OpenAI does), not a 400 naming only one.
        created = now()
        rec = BatchRecord(
            id=new_id("batch_"),
            project=project,
            endpoint=canonical,
            input_file_id=input_file_id,
            completion_window=completion_window,
            status=VALIDATING,
            created_at=created,
            expires_at=created + parse_window(completion_window),
            input_blob_key=file.blob_key,
            metadata=meta,
            output_expires_after=out_expiry,
            api=api,
            endpoint_as_sent=endpoint.split("?", 1)[0].rstrip("/") if api == API_AZURE else None,
        )
        await self._batches.insert_batch(rec)
        log.info(
            "batch %s (project %s) validating: created from %s for %s",
            rec.id,
            project,
            input_file_id,
            canonical,
            extra=about(rec),
        )
        try:
            await self._activator.activate(rec, defer_counting=True)
        except BaseException:
            # No half-made batch: one whose activation raised is removed, not left
            # ``validating`` (a crash before this line is what the engine's sweep is for).
            await asyncio.shield(self._batches.delete_unstarted_batch(rec.id))
            raise
        return await self.get(project, rec.id)

    async def get(self, project: str, batch_id: str) -> BatchRecord:
        rec = await self._batches.get_batch(batch_id, project)
        if rec is None:
            raise NotFound(
                f"No such Batch object: {excerpt(batch_id, quote=False)}",
                code="batch_not_found",
                param="batch_id",
            )
        return rec

    async def list(
        self, project: str, *, limit: int, after: str | None
    ) -> tuple[list[BatchRecord], bool]:
        rows = await self._batches.list_batches(project, limit=limit, after=after)
        return rows[:limit], len(rows) > limit

    async def cancel(self, project: str, batch_id: str) -> BatchRecord:
        rec = await self._batches.request_cancel(batch_id, project, now())
        if rec is None:
            raise NotFound(
                f"No such Batch object: {excerpt(batch_id, quote=False)}",
                code="batch_not_found",
                param="batch_id",
            )
        if rec.status == CANCELLING:
            log.info("batch %s (project %s) cancelling: cancel requested", batch_id, project,
                     extra=about(rec))
        if rec.status in TERMINAL or rec.status == "finalizing":
            raise Conflict(
                f"Cannot cancel a batch with status {rec.status!r}.",
                code="batch_not_cancellable",
            )
        return rec
