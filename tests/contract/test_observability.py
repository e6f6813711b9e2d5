"""/metrics, logs, /docs and the dashboard's guards, against a real ``batchd serve``."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, base_config
from tests.support import (
    BATCHD,
    Server,
    Upstream,
    chat_lines,
    free_port,
    spawn,
    wait_batch,
    wait_http,
)

UPSTREAM_KEY = "up-secret-key-42"
HOOK_SECRET = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="


@pytest.fixture
def hook_url() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    httpd.shutdown()
    httpd.server_close()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_metrics(
    url: str, expected: dict[tuple[str, frozenset[tuple[str, str]]], float], timeout: float = 20
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape until every expected sample has its value (the engine copies its counters
    out about once a second)."""
    deadline = time.time() + timeout
    while True:
        got = scrape(url)
        if all(got.get(k) == v for k, v in expected.items()):
            return got
        if time.time() > deadline:
            wrong = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
            raise AssertionError(f"metrics (got, expected): {wrong}")
        time.sleep(0.3)


def m(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def observed_config(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    cfg = base_config(upstream, **extra)
    cfg["deployments"] = [
        {**cfg["deployments"][0], "api_key": UPSTREAM_KEY},
        # Nothing listens there: every attempt is a connection error, retried once.
        {"model": "dead", "base_url": closed_port_url(), "max_attempts": 2},
    ]
    return cfg


def test_metrics_count_requests_batches_and_uploads(
    make_server: Callable[..., Server],
    upstream: Upstream,
    sdk: Callable[..., OpenAI],
    hook_url: str,
) -> None:
    upstream.control(reject_content="REJECT")
    server = make_server(observed_config(upstream, webhooks=[{"url": hook_url}]))
    c = sdk(server)
    lines = chat_lines(7) + chat_lines(3, prefix="REJECT")
    dead = chat_lines(2, model="dead")
    sizes = []
    for data in (lines, dead):
        f = c.files.create(file=("in.jsonl", data), purpose="batch")
        sizes.append(f.bytes)
        b = c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert wait_batch(c, b.id).status == "completed"
    got = wait_metrics(
        server.url + "/metrics",
        {
            m("batchd_upstream_requests_total", deployment="gpt-4o", outcome="ok"): 7,
            m("batchd_upstream_requests_total", deployment="gpt-4o", outcome="client_error"): 3,
            m("batchd_upstream_request_duration_seconds_count", deployment="gpt-4o"): 10,
            m("batchd_upstream_requests_total", deployment="dead", outcome="connection_error"): 4,
            m("batchd_upstream_retries_total", deployment="dead", reason="connection_error"): 2,
            # the fake upstream counts len(prompt) // 4 (at least 1) in, 3 out
            m("batchd_upstream_tokens_total", deployment="gpt-4o", direction="input"): 7,
            m("batchd_upstream_tokens_total", deployment="gpt-4o", direction="output"): 21,
            m("batchd_upstream_in_flight", deployment="gpt-4o"): 0,
            m("batchd_upstream_concurrency_limit", deployment="gpt-4o"): 32,
            m("batchd_batches", status="completed"): 2,
            m("batchd_batches", status="failed"): 0,
            m("batchd_shards", state="waiting"): 0,
            m("batchd_shards", state="leased"): 0,
            m("batchd_requests_remaining"): 0,
            m("batchd_lines_validated_total"): 12,
            m("batchd_upload_bytes_total"): sum(sizes),
            m("batchd_files_uploaded_total", purpose="batch"): 2,
            m("batchd_webhook_deliveries_total", outcome="delivered"): 2,
        },
    )
    inf = m("batchd_upstream_request_duration_seconds_bucket", deployment="gpt-4o", le="+Inf")
    assert got[inf] == 10
    assert got[m("batchd_upstream_request_duration_seconds_sum", deployment="gpt-4o")] > 0

    # A batch that fails validation counts its problems; the engine process, killed, is
    # marked dead: its live gauges are dropped, its counters stay.
    c.batches.create(
        input_file_id=c.files.create(
            file=("bad.jsonl", b'{"a": 1}\nnot json\n'), purpose="batch"
        ).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    engine = next(
        p for p in psutil.Process(server.proc.proc.pid).children() if "worker" in p.cmdline()
    )
    engine.kill()
    engine.wait(10)
    metrics_dir = server.data_dir / "metrics"
    deadline = time.time() + 10
    while list(metrics_dir.rglob(f"gauge_livesum_{engine.pid}.db")):
        assert time.time() < deadline, "the dead engine's gauges were not dropped"
        time.sleep(0.1)
    got = wait_metrics(
        server.url + "/metrics",
        {
            m("batchd_batches", status="failed"): 1,
            m("batchd_validation_problems_total", code="invalid_json_line"): 1,
            m("batchd_upstream_requests_total", deployment="gpt-4o", outcome="ok"): 7,
        },
    )


def test_a_worker_serves_its_own_metrics(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    server = make_server(base_config(upstream, engine={"embedded": False}))
    port = free_port()
    log = server.data_dir.parent / "worker-metrics.log"
    worker = spawn(
        [*BATCHD, "worker", "--config", str(server.config_path), "--metrics-port", str(port)],
        log,
    )
    server.workers.append(worker)
    url = f"http://127.0.0.1:{port}/metrics"
    wait_http(url, worker.proc, log)
    c = sdk(server)
    f = c.files.create(file=("in.jsonl", chat_lines(5)), purpose="batch")
    b = c.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_batch(c, b.id).status == "completed"
    got = wait_metrics(
        url,
        {
            m("batchd_upstream_requests_total", deployment="gpt-4o", outcome="ok"): 5,
            m("batchd_upstream_concurrency_limit", deployment="gpt-4o"): 32,
        },
    )
    # the store's state is the API's to report, not a worker's
    assert m("batchd_batches", status="completed") not in got


def test_logs_explain_and_keep_secrets(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    upstream.control(reject_content="REJECT")
    hook = closed_port_url().removesuffix("/v1") + "/hook"
    server = make_server(
        observed_config(
            upstream,
            log_format="json",
            access_log=True,
            log_level="debug",
            webhooks=[{"url": hook, "secret": HOOK_SECRET}],
        )
    )
    c = sdk(server)
    bad = c.files.create(
        file=("bad.jsonl", chat_lines(1) + b"{oops\n" + b'{"method": "POST"}\n'), purpose="batch"
    )
    failed = c.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    good = c.files.create(
        file=("ok.jsonl", chat_lines(3) + chat_lines(1, prefix="REJECT")), purpose="batch"
    )
    done = c.batches.create(
        input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_batch(c, done.id).status == "completed"
    # a wrong key, and the dashboard's sign-in with the right one
    with pytest.raises(Exception, match=r"401|Incorrect"):
        sdk(server, key="sk-wrong-key-123").batches.list()
    token = "t" * 43
    body = f"key={API_KEY}&csrf={token}".encode()
    req = urllib.request.Request(server.url + "/ui/login", data=body, method="POST")
    req.add_header("cookie", f"batchd_csrf={token}")
    with urllib.request.urlopen(req, timeout=10) as resp:  # signed in: on to the batches
        assert resp.url == server.url + "/ui/login"  # urllib drops the new cookie: asked again
    time.sleep(2.5)  # a webhook delivery attempt (it fails: nothing listens)
    server.proc.stop()
    text = server.proc.output()
    for secret in (API_KEY, UPSTREAM_KEY, HOOK_SECRET, "sk-wrong-key-123"[3:]):
        assert secret not in text
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(records) > 10
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    about_failed = [r for r in records if r.get("batch_id") == failed.id]
    assert any(
        r["message"].endswith("failed validation: 4 problems, first: line 2 invalid_json_line")
        and r["project"] == "team-a"
        for r in about_failed
    ), about_failed
    about_done = [r["message"] for r in records if r.get("batch_id") == done.id]
    assert any("validating: created from" in msg for msg in about_done)
    assert any("in progress: 4 requests" in msg for msg in about_done)
    assert any(msg.endswith("completed: 3 ok, 1 failed") for msg in about_done), about_done
    access = [r["message"] for r in records if r["logger"] == "uvicorn.access"]
    assert any('"POST /v1/batches HTTP/1.1" 200' in msg for msg in access)
    assert any("webhook" in r["message"] for r in records)


def test_docs_work_offline_and_describe_every_tree(server: Server) -> None:
    for page in ("/docs", "/redoc"):
        with urllib.request.urlopen(server.url + page, timeout=10) as resp:
            html = resp.read().decode()
        refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(
            r"""url: ?['"]([^'"]+)['"]""", html
        )
        assert refs, html
        for ref in refs:
            assert ref.startswith("/"), f"{page} loads {ref} from elsewhere"
            with urllib.request.urlopen(server.url + ref, timeout=10) as resp:
                assert resp.status == 200
        assert "fonts.googleapis" not in html and "cdn" not in html.lower()
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=10) as resp:
        schema = json.loads(resp.read())
    paths = schema["paths"]
    for tree in ("/v1", "/openai", "/openai/v1"):
        assert f"{tree}/batches/{{batch_id}}/cancel" in paths
    azure = paths["/openai/files"]["post"]
    assert any(p["name"] == "api-version" for p in azure.get("parameters", []))
    assert "/ui/" not in json.dumps(paths) and "/metrics" not in paths


def test_root_goes_to_the_dashboard_and_forms_need_their_token(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    cfg = base_config(upstream)
    del cfg["auth"]
    server = make_server(cfg)
    with urllib.request.urlopen(server.url + "/", timeout=10) as resp:
        assert resp.url == server.url + "/ui/"  # no [auth]: no sign-in
        page = resp.read().decode()
        assert "all projects" in page
    c = sdk(server)
    upstream.control(latency=0.5)
    f = c.files.create(file=("in.jsonl", chat_lines(40)), purpose="batch")
    b = c.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def post(headers: dict[str, str], body: bytes) -> int:
        req = urllib.request.Request(
            f"{server.url}/ui/batches/{b.id}/cancel", data=body, method="POST", headers=headers
        )
        req.add_header("content-type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    token = "t" * 43
    assert post({}, b"") == 403  # no token
    assert post({"cookie": f"batchd_csrf={token}"}, b"csrf=" + b"u" * 43) == 403  # wrong one
    cross = {"cookie": f"batchd_csrf={token}", "sec-fetch-site": "cross-site"}
    assert post(cross, f"csrf={token}".encode()) == 403
    assert c.batches.retrieve(b.id).status == "in_progress"
    assert post({"cookie": f"batchd_csrf={token}"}, f"csrf={token}".encode()) == 200
    assert c.batches.retrieve(b.id).status in ("cancelling", "cancelled")
