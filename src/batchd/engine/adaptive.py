"""Adaptive concurrency: the in-flight limit at which an upstream's throughput stops growing.

It starts with a slow start (as TCP's): the limit doubles each window while the latency
stays at the no-load latency, a window ending as soon as enough answers to the new level are
in, so a server of capacity K is reached in about log2(K / 8) windows of ~1.5 latencies.
Then a gradient controller after Netflix's concurrency-limits library (``Gradient2Limit``): it
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
    calm_after: int = 2  # windows in a row at no-load latency, limit in use, then ...
    calm_growth: float = 1.25  # ... the limit grows by this factor a window
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
        self._started = self.clock()
        self.windows = 0
        self._probing = False
        self._since_probe = 0
        # Slow start (as TCP's): the limit doubles each window until the latency first
        # inflates or the server refuses, so a big server is reached in a few windows.
        self._slow_start = True
        self._calm = 0  # windows in a row, after slow start, at the no-load latency
        self._ceiling = float(self.cap)  # the limit before the last 429 cut: fast growth
        # (slow start, calm windows) stops there
        self._cooldown = 0

    @property
    def current(self) -> int:
        """The limit now: requests this process may have in flight (half of it while the
        no-load latency is measured)."""
        limit = self.limit / 2 if self._probing else self.limit
        return max(self.minimum, min(self.cap, int(limit)))

    def on_answer(self, seconds: float, status: int, in_flight: int) -> bool:
        """One answer (or transport failure: pass status 0) that took ``seconds``, with
        ``in_flight`` requests in flight when it was sent. True when the limit moved.

        Only answers to requests sent with at least 3/4 of the current limit in flight
        count: after the limit rises, the answers to requests sent before say nothing
        about the new level, so a window holds only the new level's answers. In slow start
        a window ends as soon as half the limit's worth of them (at least
        ``window_samples``) is in, about 1.5 latencies after a rise, or with the first
        ``window_samples`` answers if one is a 429/503; later windows last
        two no-load latencies (averaging out noise), with at least ``window_samples``."""
        current = self.current
        if self._probing and in_flight > current:
            return False  # sent before the probe: its latency says nothing of no load
        if status in OVERLOAD_STATUSES:
            self._dropped += 1
        elif in_flight >= current * 0.75:
            self._sum += seconds
            self._count += 1
        # else: sent when far fewer were in flight (before the limit last rose, or as a
        # batch ends); its latency says nothing about the limit now
        answers = self._count + self._dropped
        if answers < self.window_samples:
            return False
        now = self.clock()
        if self._slow_start and not self._probing:
            if answers < current // 2 and not self._dropped:
                return False
        else:
            span = self.window_seconds if self.no_load is None else max(0.05, 2 * self.no_load)
            if now - self._started < span:
                return False
        self._update()
        self._started = now
        return self.current != current

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
        if self._dropped:
            # Any 429/503 ends slow start (as a loss ends TCP's). A share of at least
            # ``overload_share`` is one cut, then ``cooldown`` windows (holding) to see its
            # effect: 429s that come whatever the load (a quota) must not drive the limit
            # down to 1.
            self._slow_start, self._calm = False, 0
            if self._dropped / answers >= self.overload_share:
                if not self._cooldown:
                    self._ceiling = limit
                    limit = limit * self.backoff
                    self._cooldown = self.cooldown
                self._set(limit)
                return
        if not self._count:
            self._set(limit)
            return
        rtt = self.last_latency = self._sum / self._count
        if self.no_load is None or rtt < self.no_load or probed:
            self.no_load = rtt
        if probed:
            self._reset_window()
            return
        base = self.no_load
        gradient = max(0.5, min(1.0, self.tolerance * base / rtt))
        at_no_load = rtt <= base * self.slow_start_exit
        if self._slow_start and at_no_load:
            # Doubling (while in flight, not the server, is the bottleneck), up to where the
            # server last refused (TCP's ssthresh).
            limit = min(limit * 2, max(limit, self._ceiling))
            self._slow_start = limit < self._ceiling
        elif self._slow_start:
            # Latency rose: the server queues. Straight to the gradient's target (the
            # throughput measured at this level, rescaled to ``tolerance`` of no-load
            # latency), not by the smoothed steps: a doubling past the capacity would
            # otherwise hold a long queue for several windows.
            self._slow_start = False
            limit = limit * gradient + math.sqrt(limit)
        else:
            target = limit * gradient + math.sqrt(limit)
            self._calm = self._calm + 1 if at_no_load and not self._dropped else 0
            if self._calm >= self.calm_after and limit < self._ceiling:
                # Windows in a row at no-load latency with the limit in use: the server has
                # room (slow start ended on noise, or the server got faster). Faster than
                # the gradient's steps, but not doubling: from a level within 1.1 times the
                # no-load latency, 1.25 times it queues at most ~0.4 of the capacity.
                target = min(limit * self.calm_growth, max(limit, self._ceiling))
                limit = max(target, limit)
            else:
                limit = (1 - self.smoothing) * limit + self.smoothing * target
        self._set(limit)

    def _set(self, limit: float) -> None:
        self.limit = max(float(self.minimum), min(float(self.cap), limit))
        self._reset_window()

    def _reset_window(self) -> None:
        self._sum, self._count, self._dropped = 0.0, 0, 0
