"""Adaptive concurrency: the in-flight limit at which an upstream's throughput stops growing.

A gradient controller after Netflix's concurrency-limits library (``Gradient2Limit``): it
compares the latency of the last window of requests with the upstream's no-load latency
and moves the limit by their ratio. While latency stays within ``tolerance`` times the
no-load latency, the limit grows by about ``sqrt(limit)`` a window (the server has room:
more in flight, more throughput); when latency inflates past it (requests queue on the
server, so more in flight only adds waiting), the limit shrinks in proportion. A window
whose answers are 429/503 for at least ``overload_share`` cuts it by ``backoff``
(multiplicative decrease), then ``cooldown`` windows pass before another cut: a quota that
refuses a share of requests whatever the load does not drive it to 1. So the limit settles a
little above the server's capacity, with a short queue there, and a model server that
also serves interactive traffic keeps its latency within ``tolerance`` of its best.

Per request the cost is one addition and two comparisons; a window's update is a few
float operations. The limit holds per engine process; every process of a cluster reads the
same upstream's latency and answers, so together they converge, and the slot leases keep
their sum under ``max_concurrency_cap`` (docs/scheduling.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# Answers that say the server is overloaded.
OVERLOAD_STATUSES = frozenset({429, 503})


@dataclass
class AdaptiveLimit:
    cap: int
    limit: float = 8.0  # where a deployment starts: low, then probes upwards
    tolerance: float = 1.25  # latency inflation tolerated before the limit shrinks
    smoothing: float = 0.2  # how far a window's result moves the limit
    backoff: float = 0.8  # the limit after a window with a 429/503, relative
    window_seconds: float = 0.5  # a window lasts two no-load latencies, this long at first...
    window_samples: int = 8  # ... at least this many answers
    probe_every: int = 100  # windows between two measurements of the no-load latency
    slow_start_exit: float = 1.1  # slow start ends once latency rises this much (Hystart)
    cooldown: int = 5  # windows after a cut by a 429/503 before another
    overload_share: float = 0.2  # a window with at least this share of 429/503 is a cut
    minimum: int = 1
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.limit = float(max(self.minimum, min(self.limit, self.cap)))
        self.no_load: float | None = None  # seconds: the latency with nothing queued
        self.last_latency = 0.0  # seconds: the mean latency of the last window
        self._sum = 0.0
        self._count = 0
        self._dropped = 0  # answers of the window that were 429/503
        self._settling = False  # the window after a doubling: its answers are mostly older
        self._started = self.clock()
        self.windows = 0
        self._probing = False
        self._since_probe = 0
        # Slow start (as TCP's): the limit doubles each window until the latency first
        # inflates or the server refuses, so a big server is reached in a few windows.
        self._slow_start = True
        self._cooldown = 0

    @property
    def current(self) -> int:
        """The limit now: requests this process may have in flight (half of it while the
        no-load latency is measured)."""
        limit = self.limit / 2 if self._probing else self.limit
        return max(self.minimum, min(self.cap, int(limit)))

    def on_answer(self, seconds: float, status: int, in_flight: int) -> bool:
        """One answer (or transport failure: pass status 0) that took ``seconds``, with
        ``in_flight`` requests in flight when it was sent. True when the limit moved."""
        if self._probing and in_flight > self.current:
            return False  # sent before the probe: its latency says nothing of no load
        if status in OVERLOAD_STATUSES:
            self._dropped += 1
        elif in_flight >= self.current * 0.75:
            self._sum += seconds
            self._count += 1
        # else: sent when far fewer were in flight (before the limit last rose, or as a
        # batch ends); its latency says nothing about the limit now
        now = self.clock()
        span = self.window_seconds if self.no_load is None else max(0.05, 2 * self.no_load)
        if now - self._started >= span and (
            self._count + self._dropped >= self.window_samples
        ):
            before = self.current
            self._update()
            self._started = now
            return self.current != before
        return False

    def _update(self) -> None:
        """End a window. The no-load latency is the lowest window latency seen, measured
        afresh every ``probe_every`` windows with half the limit in flight (as TCP BBR's
        ProbeRTT does): a baseline that followed the latency up while requests queue would
        let the queue grow without end."""
        self.windows += 1
        limit = self.limit
        probed, self._probing = self._probing, False
        self._since_probe += 1
        if self._since_probe >= self.probe_every:
            self._probing, self._since_probe = True, 0
        self._cooldown = max(0, self._cooldown - 1)
        answers = self._count + self._dropped
        if answers and self._dropped / answers >= self.overload_share:
            # One cut, then ``cooldown`` windows (holding) to see its effect: 429s that come
            # whatever the load (a quota) must not drive the limit down to 1.
            if not self._cooldown:
                limit = limit * self.backoff
                self._cooldown = self.cooldown
            self._slow_start = False
        elif self._count:
            rtt = self.last_latency = self._sum / self._count
            if self.no_load is None or rtt < self.no_load or probed:
                self.no_load = rtt
            if probed:
                self._reset_window()
                return
            base = self.no_load
            gradient = max(0.5, min(1.0, self.tolerance * base / rtt))
            if self._settling:
                self._settling = False  # judge the doubled limit on the next window
            elif self._slow_start and rtt <= base * self.slow_start_exit:
                limit *= 2
                self._settling = True
            else:
                self._slow_start = False
                target = limit * gradient + math.sqrt(limit)
                limit = (1 - self.smoothing) * limit + self.smoothing * target
        self.limit = max(float(self.minimum), min(float(self.cap), limit))
        self._reset_window()

    def _reset_window(self) -> None:
        self._sum, self._count, self._dropped = 0.0, 0, 0
