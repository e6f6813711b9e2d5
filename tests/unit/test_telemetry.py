"""Metrics, logs and dashboard formatting, in process."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from bisect import bisect_left

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchd.api.docs import add_trees
from batchd.backends.base import Backend, UpstreamResponse, UpstreamTimeout, UpstreamUnavailable
from batchd.config import load_settings
from batchd.models import BatchRecord, Usage
from batchd.telemetry.logs import REDACTED, JsonFormatter, TextFormatter, about, secrets_of
from batchd.telemetry.meters import LATENCY_BUCKETS, retry_reason
from batchd.telemetry.metrics import Metrics, observe_many
from batchd.telemetry.recent import RecentWindow, totals_from
from batchd.ui import views


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_equals_observe() -> None:
    values = [0.001, 0.004, 0.02, 0.02, 0.3, 7.0, 500.0]
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lat_seconds", "h", ["d"], buckets=LATENCY_BUCKETS, registry=one)
    h2 = Histogram("lat_seconds", "h", ["d"], buckets=LATENCY_BUCKETS, registry=many)
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for v in values:
        h1.labels("m").observe(v)
        counts[bisect_left(LATENCY_BUCKETS, v)] += 1  # as DeploymentMeter counts
    observe_many(h2.labels("m"), counts, sum(values))
    assert samples(one) == samples(many)
    with pytest.raises(ValueError, match="bucket counts"):
        observe_many(h2.labels("m"), [1, 2], 1.0)


class _Backend(Backend):
    def __init__(self, answers: list[object]) -> None:
        self.answers = answers

    async def send(self, endpoint: str, body: bytes, *, time_limit: float) -> UpstreamResponse:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, UpstreamResponse)
        return answer


class _Limiter:
    in_flight = 3
    capacity = 12


def test_meter_counts_flush_into_the_series() -> None:
    metrics = Metrics()
    meter = metrics.deployment("gpt", _Limiter())
    backend = _Backend(
        [
            UpstreamResponse(200, b"{}"),
            UpstreamResponse(200, b"{}"),
            UpstreamResponse(429, b"{}"),
            UpstreamResponse(503, b"{}"),
            UpstreamResponse(400, b"{}"),
            UpstreamTimeout("slow"),
            UpstreamUnavailable("refused"),
        ]
    )

    async def run() -> None:
        for _ in range(7):
            try:
                await meter.send(backend, "/v1/chat/completions", b"{}", 1.0)
            except (UpstreamTimeout, UpstreamUnavailable):
                pass

    asyncio.run(run())
    meter.retry(UpstreamResponse(429, b""))
    meter.retry(UpstreamTimeout("x"))
    meter.tokens(Usage(input_tokens=10, output_tokens=4))
    meter.tokens(None)
    metrics.flush()
    metrics.flush()  # a second flush adds nothing
    got = samples(metrics.registry)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted({"deployment": "gpt", **labels}.items())))]

    requests = "batchd_upstream_requests_total"
    assert value(requests, outcome="ok") == 2
    assert value(requests, outcome="rate_limited") == 1
    assert value(requests, outcome="server_error") == 1
    assert value(requests, outcome="client_error") == 1
    assert value(requests, outcome="timeout") == 1
    assert value(requests, outcome="connection_error") == 1
    assert value("batchd_upstream_request_duration_seconds_count") == 7
    assert value("batchd_upstream_retries_total", reason="rate_limited") == 1
    assert value("batchd_upstream_retries_total", reason="timeout") == 1
    assert value("batchd_upstream_tokens_total", direction="input") == 10
    assert value("batchd_upstream_tokens_total", direction="output") == 4
    assert value("batchd_upstream_in_flight") == 3
    assert value("batchd_upstream_concurrency_current") == 12


def test_retry_reasons() -> None:
    assert retry_reason(UpstreamResponse(429, b"")) == "rate_limited"
    assert retry_reason(UpstreamResponse(408, b"")) == "request_timeout"
    assert retry_reason(UpstreamResponse(502, b"")) == "server_error"
    assert retry_reason(UpstreamTimeout("t")) == "timeout"
    assert retry_reason(UpstreamUnavailable("u")) == "connection_error"


def _record(msg: str, *args: object, **extra: str) -> logging.LogRecord:
    rec = logging.LogRecord("batchd.x", logging.INFO, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_text_lines_carry_the_batch_and_scrub_secrets() -> None:
    fmt = TextFormatter(["sk-secret-key-1", "abc"])
    rec = _record("shard %s/%d: lease lost", "batch_1", 0, batch_id="batch_1", project="team-a")
    line = fmt.format(rec)
    assert line.endswith("shard batch_1/0: lease lost project=team-a")
    line = fmt.format(_record("upstream said %s", "sk-secret-key-1", batch_id="b2", project="p"))
    assert "sk-secret-key-1" not in line and REDACTED in line
    assert line.endswith("batch=b2 project=p")
    # too short to scrub: left as is
    assert "abc" in fmt.format(_record("abc"))


def test_json_lines() -> None:
    fmt = JsonFormatter(["whsec_supersecret"])
    try:
        raise RuntimeError("boom whsec_supersecret")
    except RuntimeError:
        import sys

        rec = _record("failed %d", 3, **about("batch_9", "team-b"))
        rec.exc_info = sys.exc_info()
    out = json.loads(fmt.format(rec))
    assert out["message"] == "failed 3"
    assert out["batch_id"] == "batch_9" and out["project"] == "team-b"
    assert out["level"] == "info" and out["logger"] == "batchd.x"
    assert "RuntimeError: boom [redacted]" in out["exception"]
    assert out["time"].endswith("Z")


def test_every_configured_secret_is_known(tmp_path: object) -> None:
    s = load_settings(
        None,
        auth={"keys": {"sk-team-a-1": "a"}},
        deployments=[{"model": "m", "base_url": "http://h/v1", "api_key": "up-key-123"}],
        webhooks=[{"url": "http://h/hook", "secret": "whsec_abcdef"}],
        s3={"secret_access_key": "s3-secret-9"},
        database_url="postgresql://u:pg-pass-77@h/db",
    )
    assert set(secrets_of(s)) >= {
        "sk-team-a-1",
        "up-key-123",
        "whsec_abcdef",
        "s3-secret-9",
        "pg-pass-77",
    }


def test_recent_window_differences() -> None:
    def totals(ok: float, bad: float, count: float, total: float) -> object:
        reg = CollectorRegistry()
        m = Metrics(reg)
        m.upstream_requests.labels("d", "ok").inc(ok)
        m.upstream_requests.labels("d", "server_error").inc(bad)
        observe_many(
            m.upstream_latency.labels("d"),
            [0, 0, 0, 0, int(count)] + [0] * (len(LATENCY_BUCKETS) - 4),
            total,
        )
        return totals_from(reg.collect())

    window = RecentWindow(seconds=60)
    first = window.update(1000.0, totals(10, 0, 10, 0.5))["d"]  # type: ignore[arg-type]
    assert first.requests == 10 and first.seconds == 0 and first.per_second is None
    later = window.update(1010.0, totals(30, 5, 20, 1.5))["d"]  # type: ignore[arg-type]
    assert later.requests == 25 and later.errors == 5 and later.seconds == 10
    assert later.error_rate == pytest.approx(0.2)
    assert later.mean_latency == pytest.approx(0.1)
    assert later.p95_latency == 0.1


def _batch(**kw: object) -> BatchRecord:
    base: dict[str, object] = dict(
        id="batch_x",
        project="p",
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status="in_progress",
        created_at=1000,
        expires_at=90000,
        input_blob_key="k",
        in_progress_at=1000,
        total=100,
        completed=30,
        failed=10,
    )
    base.update(kw)
    return BatchRecord(**base)  # type: ignore[arg-type]


def test_progress_rate_and_eta() -> None:
    p = views.progress(_batch(), at=1020.0)
    assert (p.completed_pct, p.failed_pct) == (30.0, 10.0)
    assert p.rate == pytest.approx(2.0) and p.eta == pytest.approx(30.0)
    ended = views.progress(_batch(status="completed", completed=90), at=1020.0)
    assert ended.rate is None and ended.eta is None
    assert views.duration(3725) == "1 h 2 min" and views.size(2048) == "2.0 KiB"
    assert [n for n, _ in views.timeline(_batch(cancelling_at=1030, cancelled_at=1031))] == [
        "created",
        "in progress",
        "cancelling",
        "cancelled",
    ]


def test_openapi_lists_the_azure_trees() -> None:
    op = {"operationId": "list_files_v1_files_get", "parameters": [], "responses": {}}
    schema = add_trees({"paths": {"/v1/files": {"get": op}, "/healthz": {}}}, ["/files"])
    paths = schema["paths"]
    assert set(paths) == {"/v1/files", "/openai/files", "/openai/v1/files", "/healthz"}
    azure = paths["/openai/files"]["get"]
    assert azure["operationId"] == "list_files_v1_files_get_azure"
    assert [p["name"] for p in azure["parameters"]] == ["api-version"]
    assert paths["/openai/v1/files"]["get"]["parameters"] == []
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids)) == 3
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "api-key"}


def test_grafana_dashboard_names_only_real_series() -> None:
    from pathlib import Path

    from batchd.store.types import QueueState, SlotUse
    from batchd.telemetry.exposition import LimitsCollector, ShareCollector, StateCollector

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.deployment("m", _Limiter())
    metrics.flush()
    settings = load_settings(None)
    state = QueueState(slots={"m": SlotUse(1, 2, 3)}, project_wants={"m": {"a": 2}})
    collectors = (
        registry,
        LimitsCollector(settings),
        StateCollector(state),
        ShareCollector(settings, state),
    )
    names = {
        s.name
        for collector in collectors
        for family in collector.collect()
        for s in family.samples
    } | {f.name for f in registry.collect()}
    root = Path(__file__).parents[2]
    dashboard = json.loads((root / "docs" / "grafana" / "batchd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"batchd_[a-z_]+", e)}
    known = names | {n + suffix for n in names for suffix in ("_total", "_bucket")}
    assert used and used <= known, used - known
    documented = (root / "docs" / "observability.md").read_text()
    undocumented = [n for n in used if f"`{n.removesuffix('_bucket')}`" not in documented]
    assert undocumented == []


def test_project_shares_are_the_leases_division() -> None:
    from batchd.config import Settings
    from batchd.store.types import QueueState
    from batchd.telemetry.exposition import ShareCollector

    settings = Settings(
        deployments=[{"model": "m", "base_url": "http://x/v1", "max_concurrency": 12}],
        projects={"heavy": {"weight": 2}},
    )
    state = QueueState(project_wants={"m": {"heavy": 12, "light": 12, "small": 1}})
    (family,) = list(ShareCollector(settings, state).collect())
    got = {s.labels["project"]: s.value for s in family.samples}
    assert got == {"heavy": 7, "light": 4, "small": 1}
