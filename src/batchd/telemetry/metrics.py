"""The Prometheus series that processes count themselves, in the ``batchd_`` namespace.

One :class:`Metrics` per process (the API and each engine build their own), each with its
own registry. In ``batchd serve`` the API and its engine process share a
``prometheus_client`` multiprocess directory (see :mod:`batchd.telemetry.multiproc`), so
``/metrics`` adds up both; a ``batchd worker`` elsewhere serves its own on
``--metrics-port``. Batch and queue state is not counted here but read from the store at
scrape time (:mod:`batchd.telemetry.exposition`).

Series (names follow https://prometheus.io/docs/practices/naming/):

- ``batchd_upstream_requests_total{deployment, outcome}``: attempts sent upstream;
  outcome ``ok`` (2xx), ``client_error`` (other 4xx), ``rate_limited`` (429),
  ``server_error`` (5xx), ``timeout``, ``connection_error``;
- ``batchd_upstream_request_duration_seconds{deployment}``: histogram of their latency;
- ``batchd_upstream_in_flight{deployment}``: requests in flight now (summed over live
  processes);
- ``batchd_upstream_retries_total{deployment, reason}``: attempts that will be retried;
- ``batchd_upstream_tokens_total{deployment, direction}``: usage of the results,
  ``direction`` ``input`` or ``output``;
- ``batchd_upload_bytes_total``, ``batchd_files_uploaded_total{purpose}``: uploads;
- ``batchd_lines_validated_total``, ``batchd_validation_problems_total{code}``: batch input
  lines checked at upload and the problems found;
- ``batchd_webhook_deliveries_total{outcome}``: ``delivered`` or ``failed`` POSTs;
- ``batchd_results_streams``: followed result streams open now
  (``GET /v1/batches/{id}/results?follow=true``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from batchd.models import FileSummary
from batchd.telemetry.meters import LATENCY_BUCKETS, OUTCOMES, DeploymentMeter

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0


class InFlight(Protocol):
    @property
    def in_flight(self) -> int: ...

    @property
    def capacity(self) -> int: ...


@dataclass
class _Copied:
    """What has been copied out of a meter so far."""

    outcomes: list[int]
    buckets: list[int]
    latency_sum: float = 0.0
    retries: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.upstream_requests = Counter(
            "batchd_upstream_requests_total",
            "Requests sent to a deployment's upstream, by outcome.",
            ["deployment", "outcome"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "batchd_upstream_request_duration_seconds",
            "Time from sending a request upstream to its answer (or failure).",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_in_flight = Gauge(
            "batchd_upstream_in_flight",
            "Requests in flight to a deployment now.",
            ["deployment"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.upstream_concurrency = Gauge(
            "batchd_upstream_concurrency_current",
            "Requests a deployment may have in flight now from the live engine processes: "
            'their leased shares, within the adaptive limit with max_concurrency = "auto".',
            ["deployment"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.upstream_retries = Counter(
            "batchd_upstream_retries_total",
            "Failed attempts that are sent again, by reason.",
            ["deployment", "reason"],
            registry=r,
        )
        self.upstream_tokens = Counter(
            "batchd_upstream_tokens_total",
            "Tokens in the usage of results, by direction (input, output).",
            ["deployment", "direction"],
            registry=r,
        )
        self.upload_bytes = Counter(
            "batchd_upload_bytes_total", "Bytes of files uploaded.", registry=r
        )
        self.files_uploaded = Counter(
            "batchd_files_uploaded_total", "Files uploaded, by purpose.", ["purpose"], registry=r
        )
        self.lines_validated = Counter(
            "batchd_lines_validated_total", "Batch input lines validated.", registry=r
        )
        self.validation_problems = Counter(
            "batchd_validation_problems_total",
            "Problems found validating batch inputs, by code.",
            ["code"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "batchd_webhook_deliveries_total",
            "Webhook POSTs, by outcome (delivered, failed).",
            ["outcome"],
            registry=r,
        )
        self.results_streams = Gauge(
            "batchd_results_streams",
            "Followed result streams open now (GET .../batches/{id}/results?follow=true).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self._meters: list[tuple[DeploymentMeter, InFlight, _Copied]] = []

    # -- the engine's per-deployment counters ------------------------------------------------
    def deployment(self, name: str, in_flight: InFlight) -> DeploymentMeter:
        """A meter for one deployment, copied out by :meth:`flush`; ``in_flight.in_flight``
        (its limiter's) tells how many of its requests are in flight now."""
        meter = DeploymentMeter(name)
        copied = _Copied([0] * len(meter.outcomes), [0] * len(meter.buckets))
        copied.retries = dict.fromkeys(meter.retries, 0)
        self._meters.append((meter, in_flight, copied))
        return meter

    def flush(self) -> None:
        """Add what the meters counted since the last flush to the Prometheus series."""
        for meter, in_flight, copied in self._meters:
            name = meter.deployment
            for i, n in enumerate(meter.outcomes):
                if n != copied.outcomes[i]:
                    self.upstream_requests.labels(name, OUTCOMES[i]).inc(n - copied.outcomes[i])
                    copied.outcomes[i] = n
            buckets = list(meter.buckets)
            if buckets != copied.buckets:
                total = meter.latency_sum
                observe_many(
                    self.upstream_latency.labels(name),
                    [b - c for b, c in zip(buckets, copied.buckets, strict=True)],
                    total - copied.latency_sum,
                )
                copied.buckets, copied.latency_sum = buckets, total
            for reason, n in meter.retries.items():
                if n != copied.retries[reason]:
                    self.upstream_retries.labels(name, reason).inc(n - copied.retries[reason])
                    copied.retries[reason] = n
            for direction, n, before in (
                ("input", meter.input_tokens, copied.input_tokens),
                ("output", meter.output_tokens, copied.output_tokens),
            ):
                if n != before:
                    self.upstream_tokens.labels(name, direction).inc(n - before)
            copied.input_tokens, copied.output_tokens = meter.input_tokens, meter.output_tokens
            self.upstream_in_flight.labels(name).set(in_flight.in_flight)
            self.upstream_concurrency.labels(name).set(in_flight.capacity)

    async def run(self, seconds: float = FLUSH_SECONDS) -> None:
        """Flush every ``seconds`` until cancelled, and once more then."""
        try:
            while True:
                await asyncio.sleep(seconds)
                try:
                    self.flush()
                except Exception:
                    log.exception("copying the engine's counters to the metrics failed")
        finally:
            with contextlib.suppress(Exception):
                self.flush()

    # -- the API's counters ------------------------------------------------------------------
    def uploaded(self, purpose: str, size: int, summary: FileSummary | None) -> None:
        """A file was stored (``summary``: what validating it found, for batch inputs)."""
        self.upload_bytes.inc(size)
        self.files_uploaded.labels(purpose).inc()
        if summary is not None:
            self.lines_validated.inc(summary.lines)
            for issue in summary.issues:
                self.validation_problems.labels(issue.code).inc()

    def webhook(self, delivered: bool) -> None:
        self.webhook_deliveries.labels("delivered" if delivered else "failed").inc()


def observe_many(child: Histogram, counts: list[int], total: float) -> None:
    """Add ``counts[i]`` observations to bucket ``i`` (not cumulative; the last is +Inf)
    and ``total`` to the sum, as that many ``observe`` calls would. prometheus_client has
    no public call for it: this writes the child's ``_buckets`` and ``_sum`` values, which
    a unit test checks against ``observe``."""
    buckets = child._buckets
    if len(buckets) != len(counts):
        raise ValueError(f"{len(counts)} bucket counts for a histogram of {len(buckets)}")
    for value, n in zip(buckets, counts, strict=True):
        if n:
            value.inc(n)
    child._sum.inc(total)
