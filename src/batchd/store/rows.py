"""Rows of the SQL store to records and back, and the predicates several aggregates share."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, insert, or_, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.models import (
    API_OPENAI,
    CANCELLING,
    VALIDATING,
    BatchRecord,
    FileRecord,
    Part,
    Usage,
    new_id,
)
from batchd.store.codec import decode_issues, decode_metadata, decode_summary, encode
from batchd.store.schema import batches, events, shards

HAS_SHARDS = exists().where(shards.c.batch_id == batches.c.id)
# Not started: validating, or cancelled before its shards were made.
NOT_STARTED = or_(
    batches.c.status == VALIDATING, and_(batches.c.status == CANCELLING, ~HAS_SHARDS)
)


def file_record(row: RowMapping, *, with_summary: bool = True) -> FileRecord:
    return FileRecord(
        id=row["id"],
        project=row["project"],
        filename=row["filename"],
        purpose=row["purpose"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        status=row["status"],
        blob_key=row["blob_key"],
        expires_at=row["expires_at"],
        status_details=row["status_details"],
        summary=decode_summary(row["summary"]) if with_summary else None,
    )


def file_values(rec: FileRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "project": rec.project,
        "filename": rec.filename,
        "purpose": rec.purpose,
        "bytes": rec.bytes,
        "created_at": rec.created_at,
        "expires_at": rec.expires_at,
        "status": rec.status,
        "status_details": rec.status_details,
        "blob_key": rec.blob_key,
        "summary": encode(rec.summary),
    }


def batch_record(row: RowMapping) -> BatchRecord:
    return BatchRecord(
        id=row["id"],
        project=row["project"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=row["status"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        input_blob_key=row["input_blob_key"],
        model=row["model"],
        metadata=decode_metadata(row["metadata"]),
        output_expires_after=row["output_expires_after"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        errors=decode_issues(row["errors"]),
        in_progress_at=row["in_progress_at"],
        finalizing_at=row["finalizing_at"],
        completed_at=row["completed_at"],
        failed_at=row["failed_at"],
        expired_at=row["expired_at"],
        cancelling_at=row["cancelling_at"],
        cancelled_at=row["cancelled_at"],
        total=row["total"],
        completed=row["completed"],
        failed=row["failed"],
        usage=Usage(
            input_tokens=row["input_tokens"],
            cached_tokens=row["cached_tokens"],
            output_tokens=row["output_tokens"],
            reasoning_tokens=row["reasoning_tokens"],
        ),
        token_estimate=row["token_estimate"],
        api=row["api"] or API_OPENAI,
        endpoint_as_sent=row["endpoint_as_sent"],
    )


def part_record(row: RowMapping) -> Part:
    return Part(
        row["batch_id"],
        row["shard_idx"],
        row["seq"],
        row["blob_key"],
        row["out_lines"],
        row["err_lines"],
        row["first_pos"],
    )


async def record_event(conn: AsyncConnection, batch_id: str, status: str, at: int) -> None:
    """Add ``batch.<status>`` to the outbox, in the transaction that ended the batch."""
    project = (
        await conn.execute(select(batches.c.project).where(batches.c.id == batch_id))
    ).scalar_one()
    await conn.execute(
        insert(events).values(
            id=new_id("evt_"),
            project=project,
            batch_id=batch_id,
            type=f"batch.{status}",
            created_at=at,
            attempts=0,
            next_attempt_at=0.0,
        )
    )
