"""The metadata schema (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Alembic migrations in ``migrations/`` create exactly this; a test compares the two.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(255), nullable=False),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("status", String(16), nullable=False),
    Column("status_details", Text, nullable=True),
    Column("blob_key", Text, nullable=False),
    # What validating a batch input found (done while it was uploaded).
    Column("summary", LargeBinary, nullable=True),
    # Deleted by its owner; the blob is kept until no unfinished batch reads it.
    Column("deleted_at", BigInteger, nullable=True),
    Index("ix_files_project_id", "project", "id"),
    Index("ix_files_status", "status"),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(255), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("model", Text, nullable=True),
    Column("input_file_id", String(64), nullable=False),
    Column("input_blob_key", Text, nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("errors", LargeBinary, nullable=True),
    Column("metadata", LargeBinary, nullable=True),
    Column("output_expires_after", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger, nullable=True),
    Column("finalizing_at", BigInteger, nullable=True),
    Column("completed_at", BigInteger, nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("expired_at", BigInteger, nullable=True),
    Column("cancelling_at", BigInteger, nullable=True),
    Column("cancelled_at", BigInteger, nullable=True),
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("token_estimate", BigInteger, nullable=False, default=0),
    # Finalising is leased like a shard; its output ids are chosen once, so a redo reuses them.
    Column("final_owner", String(64), nullable=True),
    Column("final_until", Float, nullable=True),
    # "azure" for a batch created on the /openai tree (both result files, endpoint as sent)
    Column("api", String(16), nullable=True),
    Column("endpoint_as_sent", String(64), nullable=True),
    Index("ix_batches_project_id", "project", "id"),
    Index("ix_batches_status", "status"),
    Index("ix_batches_input_file", "input_file_id"),
)

shards = Table(
    "shards",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("start_offset", BigInteger, nullable=False),
    Column("end_offset", BigInteger, nullable=False),
    Column("first_line", Integer, nullable=False),
    Column("line_count", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("token", Integer, nullable=False, default=0),
    Column("done", LargeBinary, nullable=False),
    Column("part_seq", Integer, nullable=False, default=0),
    # parked: not claimed before this time (the deployment asked for a long pause)
    Column("not_before", Float, nullable=True),
    Index("ix_shards_claim", "status", "lease_until"),
)

parts = Table(
    "parts",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("shard_idx", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("blob_key", Text, nullable=False),
    Column("out_lines", Integer, nullable=False),
    Column("err_lines", Integer, nullable=False),
    # the batch position of the part's first record, fixed in its checkpoint's transaction
    Column("first_pos", BigInteger, nullable=False),
    Index("ix_parts_positions", "batch_id", "first_pos", unique=True),
)

# Cluster-wide deployment limits: each engine process leases a share of a deployment's
# in-flight slots, renewed with its heartbeat; a row whose lease lapsed frees its slots.
deployment_slots = Table(
    "deployment_slots",
    metadata,
    Column("deployment", String(255), primary_key=True),
    Column("owner", String(64), primary_key=True),
    Column("want", Integer, nullable=False),
    Column("slots", Integer, nullable=False),
    Column("until", Float, nullable=False),
    Column("projects", LargeBinary, nullable=True),  # JSON: want by project
)

# Batch events (the outbox of webhooks): written in the transaction that ends a batch, delivered
# by any engine, retried with backoff until every subscribed URL took it.
events = Table(
    "events",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(255), nullable=False),
    Column("batch_id", String(64), nullable=False),
    Column("type", String(32), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=True),
    Column("delivered_at", BigInteger, nullable=True),
    Index("ix_events_pending", "delivered_at", "next_attempt_at"),
)

# Idempotency-Key of a create (``kind``: "batch" or "file"), per project: the first request's
# fingerprint (sha256 hex of what makes two requests "the same") and the object it made
# (None while the first request is still running). Kept 24 h (CONTRACT.md, extensions).
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("project", String(255), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("result_id", String(64), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_idempotency_keys_created", "created_at"),
)

# Named leases: a job that one process at a time runs across replicas (the retention reaper)
# holds its row until ``until`` (unix seconds); a lapsed row may be taken by anyone.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("until", Float, nullable=False),
)

# Anthropic's Message Batches: each is one batch of the project (its requests translated to
# chat completions); ``counts`` (JSON) are the final request counts, kept once it ended.
message_batches = Table(
    "message_batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(255), nullable=False),
    Column(
        "batch_id",
        String(64),
        ForeignKey("batches.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    Column("created_at", BigInteger, nullable=False),
    Column("deleted_at", BigInteger, nullable=True),
    Column("counts", LargeBinary, nullable=True),
    Index("ix_message_batches_project_id", "project", "id"),
)
