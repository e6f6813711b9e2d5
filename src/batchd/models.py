"""Domain records: files, batches, shards and parts, and their OpenAI wire shapes; the
endpoints a batch may name.

These import nothing else of batchd's. Timestamps are unix seconds (int) on the wire; leases
use float seconds.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# File statuses (the wire values).
FILE_PROCESSED = "processed"
FILE_ERROR = "error"

# Batch statuses (the wire values).
VALIDATING = "validating"
FAILED = "failed"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
TERMINAL = frozenset({FAILED, COMPLETED, EXPIRED, CANCELLED})

# Shard statuses.
SHARD_PENDING = "pending"
SHARD_DONE = "done"

# The endpoints a batch may name, in their canonical OpenAI spelling.
CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"
ENDPOINTS = (CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, RESPONSES, MODERATIONS)


def normalise_endpoint(url: str) -> str | None:
    """Map an OpenAI (``/v1/chat/completions``) or Azure (``/chat/completions``) path to the
    canonical one, or ``None`` when it names no supported endpoint."""
    path = url.split("?", 1)[0].rstrip("/")
    if not path.startswith("/v1/"):
        path = "/v1" + (path if path.startswith("/") else "/" + path)
    return path if path in ENDPOINTS else None


API_OPENAI = "openai"
API_AZURE = "azure"  # created on the /openai tree: both result files, endpoint as sent
API_ANTHROPIC = "anthropic"  # a message batch (/v1/messages/batches): OpenAI result files

# The endpoint of a message batch whose model's deployment speaks Anthropic's Messages API
# (``api_style = "anthropic"``): its requests' params are the bodies, passed through. A batch
# endpoint only for message batches (``POST /v1/batches`` takes OpenAI's endpoints).
MESSAGES_ENDPOINT = "/v1/messages"

PURPOSE_BATCH = "batch"
PURPOSE_OUTPUT = "batch_output"


_last_id = [0, 0]  # (ms, random part) of the newest id made by this process


def new_id(prefix: str) -> str:
    """A time-ordered id (UUIDv7 layout): ids sort by creation, which pagination relies on.
    Within one millisecond of one process the random part counts up, so order holds there too."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(9), "big") >> 2  # 70 of the 74 random bits: room to count
    if ms <= _last_id[0]:
        ms, rand = _last_id[0], _last_id[1] + 1 + (rand & 0xFFFF)
    _last_id[0], _last_id[1] = ms, rand
    value = (
        (ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76  # version 7
        | ((rand >> 62) & 0xFFF) << 64
        | 0x2 << 62  # RFC 4122 variant
        | (rand & ((1 << 62) - 1))
    )
    return f"{prefix}{uuid.UUID(int=value)}"


def now() -> int:
    return int(time.time())


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class ShardSpan:
    """A contiguous run of input lines: bytes [start, end) holding lines first_line.. (1-based)."""

    start: int
    end: int
    first_line: int
    count: int


@dataclass(slots=True)
class FileSummary:
    """What validating a batch input found, kept with the file for creating batches."""

    lines: int = 0
    issues: list[ValidationIssue] = field(default_factory=list)
    jsonl_ok: bool = True  # False: not JSONL at all (the file ends in status "error")
    urls: dict[str, list[int]] = field(default_factory=dict)  # url -> [count, first lines...]
    models: dict[str, list[int]] = field(default_factory=dict)  # model -> [count, first lines...]
    shards: list[ShardSpan] = field(default_factory=list)
    token_estimate: int = 0


@dataclass(slots=True)
class FileRecord:
    id: str
    project: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    status: str
    blob_key: str
    expires_at: int | None = None
    status_details: str | None = None
    summary: FileSummary | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "status_details": self.status_details,
            "expires_at": self.expires_at,
        }


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens

    def to_wire(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.total_tokens,
        }


@dataclass(slots=True)
class BatchRecord:
    id: str
    project: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    input_blob_key: str
    model: str | None = None
    metadata: dict[str, str] | None = None
    output_expires_after: int | None = None  # seconds
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[ValidationIssue] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    token_estimate: int = 0
    api: str = API_OPENAI
    endpoint_as_sent: str | None = None

    @property
    def wire_endpoint(self) -> str:
        """The endpoint as the batch shows it: canonical on OpenAI's trees, as the client
        sent it (``/chat/completions``) on Azure's."""
        if self.api == API_AZURE and self.endpoint_as_sent:
            return self.endpoint_as_sent
        return self.endpoint

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.wire_endpoint,
            "model": self.model,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            # Chosen when finalising starts, but shown only once the files can be read.
            "output_file_id": self.output_file_id if self.ended else None,
            "error_file_id": self.error_file_id if self.ended else None,
            "errors": (
                {"object": "list", "data": [e.to_wire() for e in self.errors]}
                if self.errors
                else None
            ),
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
            "usage": self.usage.to_wire(),
        }


@dataclass(frozen=True, slots=True)
class ShardClaim:
    """A shard leased to one worker. ``token`` fences its writes: a checkpoint with a stale
    token is refused, so a worker that lost its lease can never add results."""

    batch_id: str
    idx: int
    span: ShardSpan
    token: int
    done: bytes  # bitmap over the shard's lines (bit i: line first_line+i has a result)
    part_seq: int  # the last part stored for the shard
    endpoint: str
    input_blob_key: str
    expires_at: int
    project: str = ""  # the batch's, for log lines


@dataclass(frozen=True, slots=True)
class Part:
    """One checkpoint's results of a shard: one blob of result records
    (:mod:`batchd.results.record`), ``out_lines`` succeeded and ``err_lines`` not.

    ``first_pos``: the batch position of its first record, assigned by the store when the
    part is committed (-1 before); its records hold positions ``first_pos`` to
    ``first_pos + lines - 1``. The never-executed requests of a batch are its last part, on
    shard :data:`UNEXECUTED_SHARD`."""

    batch_id: str
    shard_idx: int
    seq: int
    key: str
    out_lines: int
    err_lines: int
    first_pos: int = -1

    @property
    def lines(self) -> int:
        return self.out_lines + self.err_lines


UNEXECUTED_SHARD = -1  # the shard index of a batch's part of never-executed requests


@dataclass(frozen=True, slots=True)
class BatchSignal:
    """What a worker needs to know of a running batch, polled about every half second."""

    batch_id: str
    status: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class BatchEvent:
    """A batch reached an end (``batch.completed|failed|expired|cancelled``), for webhooks."""

    id: str
    project: str
    batch_id: str
    type: str
    created_at: int
    attempts: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "event",
            "type": self.type,
            "created_at": self.created_at,
            "data": {"id": self.batch_id},
        }
