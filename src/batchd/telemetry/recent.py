"""Recent figures of each deployment (requests, error rate, latency) for the dashboard.

The Prometheus series are totals since the processes started; "recent" is the difference
between now and a reading up to :data:`WINDOW_SECONDS` old, kept by :class:`RecentWindow`
(in the memory of the API process that draws the page: a view, nothing another process
needs). The first reading compares with zero, so it shows the totals since the start.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import Metric

WINDOW_SECONDS = 300.0


@dataclass
class Totals:
    """One deployment's series, as read from the metrics."""

    requests: dict[str, float] = field(default_factory=dict)  # outcome -> count
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    latency_sum: float = 0.0
    latency_count: float = 0.0
    in_flight: float = 0.0
    input_tokens: float = 0.0
    output_tokens: float = 0.0


@dataclass(frozen=True)
class Recent:
    seconds: float  # the span the figures cover
    requests: int
    errors: int  # answers other than 2xx, and transport failures
    rate_limited: int
    mean_latency: float | None  # seconds
    p95_latency: float | None  # seconds: the upper bound of the bucket holding the 95th
    in_flight: int
    input_tokens: int
    output_tokens: int

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def per_second(self) -> float | None:
        return self.requests / self.seconds if self.seconds > 0 else None


def totals_from(metrics: Iterable[Metric]) -> dict[str, Totals]:
    """Per deployment, from the ``batchd_upstream_*`` families."""
    out: dict[str, Totals] = {}
    for family in metrics:
        for s in family.samples:
            name = s.labels.get("deployment")
            if name is None:
                continue
            t = out.setdefault(name, Totals())
            if s.name == "batchd_upstream_requests_total":
                t.requests[s.labels["outcome"]] = s.value
            elif s.name == "batchd_upstream_request_duration_seconds_bucket":
                t.buckets[float(s.labels["le"])] = s.value
            elif s.name == "batchd_upstream_request_duration_seconds_sum":
                t.latency_sum = s.value
            elif s.name == "batchd_upstream_request_duration_seconds_count":
                t.latency_count = s.value
            elif s.name == "batchd_upstream_in_flight":
                t.in_flight = s.value
            elif s.name == "batchd_upstream_tokens_total":
                if s.labels.get("direction") == "input":
                    t.input_tokens = s.value
                else:
                    t.output_tokens = s.value
    return out


def _p95(now: dict[float, float], before: dict[float, float]) -> float | None:
    counts = sorted((le, now[le] - before.get(le, 0.0)) for le in now)
    if not counts or counts[-1][1] <= 0:
        return None
    target = 0.95 * counts[-1][1]
    for le, cumulative in counts:
        if cumulative >= target:
            return None if math.isinf(le) else le
    return None


def difference(now: Totals, before: Totals, seconds: float) -> Recent:
    requests = sum(now.requests.values()) - sum(before.requests.values())
    ok = now.requests.get("ok", 0.0) - before.requests.get("ok", 0.0)
    limited = now.requests.get("rate_limited", 0.0) - before.requests.get("rate_limited", 0.0)
    count = now.latency_count - before.latency_count
    return Recent(
        seconds=seconds,
        requests=int(requests),
        errors=int(requests - ok),
        rate_limited=int(limited),
        mean_latency=(now.latency_sum - before.latency_sum) / count if count > 0 else None,
        p95_latency=_p95(now.buckets, before.buckets),
        in_flight=int(now.in_flight),
        input_tokens=int(now.input_tokens - before.input_tokens),
        output_tokens=int(now.output_tokens - before.output_tokens),
    )


class RecentWindow:
    def __init__(self, seconds: float = WINDOW_SECONDS) -> None:
        self._seconds = seconds
        self._readings: deque[tuple[float, dict[str, Totals]]] = deque()

    def update(self, at: float, totals: dict[str, Totals]) -> dict[str, Recent]:
        """Add a reading taken at ``at`` (unix seconds); the figures since the newest
        reading at least the window old (or the oldest there is). With no earlier reading:
        the totals, over ``seconds`` 0 (since the processes started)."""
        while len(self._readings) > 1 and at - self._readings[1][0] >= self._seconds:
            self._readings.popleft()
        base_at, base = self._readings[0] if self._readings else (at, {})
        self._readings.append((at, totals))
        return {
            name: difference(t, base.get(name, Totals()), at - base_at)
            for name, t in totals.items()
        }
