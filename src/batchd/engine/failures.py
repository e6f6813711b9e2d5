"""Per-item failure tracking for the engine's side loops (sweep, activation, finalising).

One batch (or event) whose handling raises must never stop a loop for everyone else: the
loop logs the error with the item's id, skips that item for a backoff (2 s doubling, at
most 60 s) and goes on with the others at once. After :data:`MAX_TRIES` failures the caller
gives the item up (a batch ends ``failed`` with an ``errors.data`` entry naming the error).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_TRIES = 5
FIRST_BACKOFF = 2.0
MAX_BACKOFF = 60.0


@dataclass(slots=True)
class _Failures:
    count: int
    retry_at: float
    last: str


class FailureTracker:
    """What failed, how often, and when it may be tried again (this process's view)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._items: dict[str, _Failures] = {}
        self.total = 0  # failures counted since start (for tests and metrics)

    def due(self, key: str) -> bool:
        """Whether ``key`` may be tried now (never failed, or its backoff is over)."""
        entry = self._items.get(key)
        return entry is None or time.time() >= entry.retry_at

    def failed(self, key: str, exc: BaseException) -> int:
        """Record a failure of ``key``; return how many in a row. Logs it with the id."""
        entry = self._items.get(key)
        count = 1 if entry is None else entry.count + 1
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (count - 1))
        last = f"{type(exc).__name__}: {exc}"[:500]
        self._items[key] = _Failures(count, time.time() + delay, last)
        self.total += 1
        log.error(
            "%s %s failed (%d of %d tries): %s", self._what, key, count, MAX_TRIES, last,
            exc_info=exc,
        )
        return count

    def given_up(self, key: str) -> bool:
        entry = self._items.get(key)
        return entry is not None and entry.count >= MAX_TRIES

    def last_error(self, key: str) -> str:
        entry = self._items.get(key)
        return entry.last if entry is not None else ""

    def succeeded(self, key: str) -> None:
        self._items.pop(key, None)
