"""Formatting for the dashboard's templates: times, sizes, progress, rate and ETA."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from batchd.models import BatchRecord

RUNNING = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "cancelling",
    "cancelled",
    "expired",
)


def when(ts: int | float | None) -> str:
    """``2026-01-05 12:30:01 UTC``, or an empty string."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(ts: int | float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def duration(seconds: float | None) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 5 min``, ``3 d 4 h``."""
    if seconds is None:
        return ""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def percent(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def seconds_ms(x: float | None) -> str:
    return "" if x is None else f"{1000 * x:.0f} ms"


@dataclass(frozen=True)
class Progress:
    total: int
    completed: int
    failed: int
    completed_pct: float  # 0..100, for the bar
    failed_pct: float
    rate: float | None  # requests a second since the batch started, while it runs
    eta: float | None  # seconds left at that rate

    @property
    def done(self) -> int:
        return self.completed + self.failed


def progress(batch: BatchRecord, at: float | None = None) -> Progress:
    """Counts and bar widths; the average rate since ``in_progress_at`` and the time left at
    that rate while the batch is in progress."""
    at = time.time() if at is None else at
    total, ok, bad = batch.total, batch.completed, batch.failed
    done = ok + bad
    rate = eta = None
    if batch.status == "in_progress" and batch.in_progress_at is not None:
        elapsed = at - batch.in_progress_at
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            eta = max(0, total - done) / rate
    return Progress(
        total,
        ok,
        bad,
        100.0 * ok / total if total else 0.0,
        100.0 * bad / total if total else 0.0,
        rate,
        eta,
    )


def timeline(batch: BatchRecord) -> list[tuple[str, int]]:
    """Every timestamp the batch has, in order."""
    stamps = [
        ("created", batch.created_at),
        ("in progress", batch.in_progress_at),
        ("finalizing", batch.finalizing_at),
        ("cancelling", batch.cancelling_at),
        ("completed", batch.completed_at),
        ("failed", batch.failed_at),
        ("expired", batch.expired_at),
        ("cancelled", batch.cancelled_at),
    ]
    return sorted(((name, ts) for name, ts in stamps if ts is not None), key=lambda p: p[1])


def any_running(batches: list[BatchRecord]) -> bool:
    return any(b.status in RUNNING for b in batches)
