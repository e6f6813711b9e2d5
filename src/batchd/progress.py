"""How ``batchd submit --wait`` shows a running batch: a progress bar that updates in place
(rich) when stderr is a terminal, plain lines otherwise (logs, CI, pipes).

Both show the batch's status, requests done (completed + failed) of the total, the failed
count, the rate in requests a second and the time left. The rate is measured by the client
over the last :data:`RATE_WINDOW_SECONDS` of polls (done requests over elapsed time), so it
follows the batch as it speeds up or slows down; the time left is what remains at that rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

RATE_WINDOW_SECONDS = 30.0
PLAIN_EVERY_SECONDS = 5.0  # plain lines: at most one this often while the counts move


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the display shows of one poll of the batch."""

    status: str
    done: int  # completed + failed
    failed: int
    total: int
    rate: float | None  # requests a second; None until two polls are apart
    eta: float | None  # seconds left at that rate

    @property
    def rate_text(self) -> str:
        return "-- req/s" if self.rate is None else f"{self.rate:,.1f} req/s"

    @property
    def eta_text(self) -> str:
        if self.eta is None:
            return "--:--"
        seconds = int(self.eta + 0.5)
        hours, rest = divmod(seconds, 3600)
        return (
            f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
            if hours
            else f"{rest // 60}:{rest % 60:02d}"
        )

    def line(self) -> str:
        """The plain form: ``in_progress: 120/1,000 done, 3 failed, 45.2 req/s, ETA 0:19``."""
        text = f"{self.status}: {self.done:,}/{self.total:,} done, {self.failed:,} failed"
        if self.status == "in_progress":
            text += f", {self.rate_text}, ETA {self.eta_text}"
        return text


class RateMeter:
    """Requests a second over a sliding window of ``(time, done)`` samples."""

    def __init__(
        self, window: float = RATE_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def snapshot(self, batch: Mapping[str, Any]) -> Snapshot:
        counts = batch.get("request_counts") or {}
        completed = int(counts.get("completed") or 0)
        failed = int(counts.get("failed") or 0)
        total = int(counts.get("total") or 0)
        done = completed + failed
        now = self.clock()
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # the counts went back: start over
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        first_t, first_done = self._samples[0]
        rate = eta = None
        if now > first_t:
            rate = (done - first_done) / (now - first_t)
            eta = max(total - done, 0) / rate if rate > 0 else None
        return Snapshot(batch.get("status", "?"), done, failed, total, rate, eta)


class Display(Protocol):
    def update(self, snap: Snapshot) -> None: ...

    def close(self) -> None: ...


class PlainDisplay:
    """One line when the status changes, and at most every ``every`` seconds while the
    counts move: readable in a log file."""

    def __init__(
        self,
        stream: TextIO,
        every: float = PLAIN_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.every = every
        self.clock = clock
        self._last: Snapshot | None = None
        self._printed_at = float("-inf")

    def update(self, snap: Snapshot) -> None:
        last = self._last
        moved = last is None or (snap.done, snap.total) != (last.done, last.total)
        now = self.clock()
        if (
            last is None
            or snap.status != last.status
            or (moved and now - self._printed_at >= self.every)
        ):
            print(snap.line(), file=self.stream, flush=True)
            self._printed_at = now
            self._last = snap

    def close(self) -> None:
        pass


class RichDisplay:
    """A progress bar redrawn in place: status, bar, done/total, failed, rate, time left."""

    def __init__(self, stream: TextIO, *, force_terminal: bool | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(file=stream, force_terminal=force_terminal)
        self._progress = Progress(
            TextColumn("{task.description:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            auto_refresh=False,
        )
        self._task = self._progress.add_task("", total=None, failed=0, rate="", eta="")
        self._progress.start()

    def update(self, snap: Snapshot) -> None:
        self._progress.update(
            self._task,
            description=snap.status,
            completed=snap.done,
            total=snap.total or None,  # None: a pulsing bar while the total is not known
            failed=f"{snap.failed:,}",
            rate=snap.rate_text,
            eta=snap.eta_text,
        )
        self._progress.refresh()

    def close(self) -> None:
        self._progress.stop()


def display_for(stream: TextIO) -> Display:
    """The rich bar on a terminal, plain lines anywhere else."""
    if stream.isatty():
        return RichDisplay(stream)
    return PlainDisplay(stream)
