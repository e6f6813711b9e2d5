"""``/metrics``: the processes' own series plus the state read from the store at scrape time.

Series from the store (gauges, right across replicas since every replica reads the same
store):

- ``batchd_batches{status}``: batches by status;
- ``batchd_shards{state}``: shards of running batches, ``waiting`` or ``leased``;
- ``batchd_requests_remaining``: requests not yet done in running batches;
- ``batchd_deployment_slots{deployment}`` and ``batchd_deployment_slots_wanted{deployment}``:
  the deployment's in-flight slots held and wanted by the live engine processes;

and from the configuration: ``batchd_upstream_concurrency_limit{deployment}`` (its
``max_concurrency``; with ``"auto"``, ``max_concurrency_cap``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from batchd.config import Settings
from batchd.store.types import QueueState, fair_shares
from batchd.telemetry import multiproc

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)


class LimitsCollector(Collector):
    """Each deployment's configured concurrency limit."""

    def __init__(self, settings: Settings) -> None:
        self._limits = {d.model: d.concurrency_limit for d in settings.effective_deployments()}

    def collect(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily(
            "batchd_upstream_concurrency_limit",
            "Requests a deployment may have in flight across all engines (max_concurrency; "
            'with "auto", max_concurrency_cap).',
            labels=["deployment"],
        )
        for name, value in self._limits.items():
            limit.add_metric([name], value)
        yield limit


class ShareCollector(Collector):
    """Each project's fair share of each deployment's slots now, from the projects' wants
    over the live engine processes (the division the slot leases make:
    :func:`batchd.store.types.fair_shares`)."""

    def __init__(self, settings: Settings, state: QueueState) -> None:
        self._settings = settings
        self._state = state

    def collect(self) -> Iterator[Metric]:
        share = GaugeMetricFamily(
            "batchd_deployment_project_share",
            "In-flight slots of a deployment that a project's fair share gives it now.",
            labels=["deployment", "project"],
        )
        for d in self._settings.effective_deployments():
            wants = self._state.project_wants.get(d.model, {})
            weight = self._settings.project_weight
            for project, n in sorted(fair_shares(d.concurrency_limit, wants, weight).items()):
                share.add_metric([d.model, project], n)
        yield share


class StateCollector(Collector):
    """The store's view of batches and the queue, read just before the scrape."""

    def __init__(self, state: QueueState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._state
        by_status = GaugeMetricFamily("batchd_batches", "Batches by status.", labels=["status"])
        for status in (*STATUSES, *sorted(set(s.batches) - set(STATUSES))):
            by_status.add_metric([status], s.batches.get(status, 0))
        yield by_status
        shard_states = GaugeMetricFamily(
            "batchd_shards", "Shards of running batches, waiting or leased.", labels=["state"]
        )
        shard_states.add_metric(["waiting"], s.shards_waiting)
        shard_states.add_metric(["leased"], s.shards_leased)
        yield shard_states
        yield GaugeMetricFamily(
            "batchd_requests_remaining",
            "Requests of running batches without a result yet.",
            value=s.requests_left,
        )
        held = GaugeMetricFamily(
            "batchd_deployment_slots",
            "In-flight slots of a deployment held by the live engine processes.",
            labels=["deployment"],
        )
        wanted = GaugeMetricFamily(
            "batchd_deployment_slots_wanted",
            "In-flight slots of a deployment the live engine processes could use now.",
            labels=["deployment"],
        )
        for name, use in sorted(s.slots.items()):
            held.add_metric([name], use.slots)
            wanted.add_metric([name], use.want)
        yield held
        yield wanted


class _Fixed(Collector):
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def process_metrics(own: CollectorRegistry) -> list[Metric]:
    """The processes' own series: summed over the multiprocess directory when there is
    one, else this process's ``own`` registry. Reads files: call it off the event loop."""
    path = multiproc.directory()
    if path:
        collector = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
        return list(collector.collect())  # type: ignore[no-untyped-call]
    return list(own.collect())


def render(own: CollectorRegistry, settings: Settings, state: QueueState | None) -> bytes:
    """The text exposition of everything: this host's processes, the limits and (for the
    API) the store's state. Reads files: call it off the event loop."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(process_metrics(own)))
    registry.register(LimitsCollector(settings))
    if state is not None:
        registry.register(StateCollector(state))
        registry.register(ShareCollector(settings, state))
    return generate_latest(registry)


def serve(
    port: int, own: CollectorRegistry, settings: Settings, host: str = "0.0.0.0"
) -> WSGIServer:
    """Serve a worker's own series on ``host:port`` (every interface by default; any path
    answers) from a thread of ``prometheus_client``'s, for as long as the process runs."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Live(own))
    registry.register(LimitsCollector(settings))
    server, _thread = start_http_server(port, host, registry)
    return server


class _Live(Collector):
    def __init__(self, own: CollectorRegistry) -> None:
        self._own = own

    def collect(self) -> Iterator[Metric]:
        return iter(process_metrics(self._own))
