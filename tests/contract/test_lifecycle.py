"""Cancel, expiry, crashes and upstream failures: every custom_id ends exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from openai import OpenAI

from tests.conftest import API_KEY, base_config
from tests.support import Server, Upstream, chat_lines, read_jsonl, start_server, start_worker
from tests.support import wait_batch as wait


def _submit(c: OpenAI, n: int, window: str = "24h", prefix: str = "req") -> str:
    file = c.files.create(file=("in.jsonl", chat_lines(n, prefix=prefix)), purpose="batch")
    return c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window=window
    ).id


def _results(c: OpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = read_jsonl(c.files.content(batch.output_file_id).text) if batch.output_file_id else []
    err = read_jsonl(c.files.content(batch.error_file_id).text) if batch.error_file_id else []
    return out, err


def _exactly_once(
    out: list[dict[str, Any]], err: list[dict[str, Any]], n: int, prefix: str = "req"
) -> None:
    ids = [r["custom_id"] for r in out + err]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    assert sorted(ids) == sorted(f"{prefix}-{i}" for i in range(n))


def _wait_progress(c: OpenAI, batch_id: str, at_least: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        b = c.batches.retrieve(batch_id)
        if b.request_counts and b.request_counts.completed >= at_least:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no progress on {batch_id}")


def _duplicates(upstream: Upstream) -> int:
    answered: dict[str, int] = upstream.stats()["answered"]
    return sum(n - 1 for n in answered.values() if n > 1)


def test_cancel_keeps_partial_results(client: OpenAI, upstream: Upstream) -> None:
    upstream.control(latency=0.2)
    batch_id = _submit(client, 400)
    _wait_progress(client, batch_id, 40)
    cancelled = client.batches.cancel(batch_id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at
    t0 = time.time()
    batch = wait(client, batch_id, timeout=10)
    assert batch.status == "cancelled" and time.time() - t0 < 10
    assert batch.cancelled_at
    out, err = _results(client, batch)
    assert len(out) >= 40
    assert all(r["error"]["code"] == "batch_cancelled" for r in err)
    assert err and all(r["response"] is None for r in err)
    _exactly_once(out, err, 400)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(out), len(err))
    # A finished batch cannot be cancelled: 409, and the SDK is told not to retry.
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{client.base_url}batches/{batch_id}/cancel",
        method="POST",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    try:
        urllib.request.urlopen(req)
        raise AssertionError("expected 409")
    except urllib.error.HTTPError as exc:
        with exc:
            assert exc.code == 409
            assert exc.headers["x-should-retry"] == "false"


def test_expiry_with_30s_window(client: OpenAI, upstream: Upstream) -> None:
    upstream.control(latency=0.5)
    # 32 in flight at 0.5 s each: ~64 requests/s, so 3000 cannot finish in 30 s.
    batch_id = _submit(client, 3000, window="30s")
    batch = wait(client, batch_id, timeout=60)
    assert batch.status == "expired"
    assert batch.expired_at and batch.expired_at >= batch.created_at + 30
    out, err = _results(client, batch)
    assert out, "finished requests stay in the output file"
    assert err and {r["error"]["code"] for r in err} == {"batch_expired"}
    _exactly_once(out, err, 3000)


def test_retries_through_500s_and_429_storm(client: OpenAI, upstream: Upstream) -> None:
    upstream.control(fail_rate=0.2, rate_limit_rate=0.3, retry_after=0.05)
    batch_id = _submit(client, 300)
    batch = wait(client, batch_id, timeout=90)
    assert batch.status == "completed"
    out, err = _results(client, batch)
    assert not err, err[:3]
    assert len(out) == 300
    _exactly_once(out, err, 300)
    status = upstream.stats()["status"]
    assert int(status["500"]) > 20 and int(status["429"]) > 20


def test_kill9_serve_and_restart(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    upstream.control(latency=0.02)
    server = make_server(base_config(upstream))
    c = sdk(server, retries=2)
    n = 3000
    batch_id = _submit(c, n)
    _wait_progress(c, batch_id, 300)
    server.proc.kill9()
    restarted = start_server(server.config_path, server.config_path.parent)
    try:
        c = sdk(restarted, retries=2)
        batch = wait(c, batch_id, timeout=90)
        assert batch.status == "completed"
        out, err = _results(c, batch)
        assert not err
        _exactly_once(out, err, n)
        # At most what was in flight (32) was sent twice.
        assert _duplicates(upstream) <= 32
    finally:
        restarted.proc.stop()


def test_two_workers_one_killed(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    upstream.control(latency=0.02)
    cfg = base_config(upstream, engine={"embedded": False})
    server = make_server(cfg)
    workers = [start_worker(server.config_path, server.config_path.parent, i) for i in range(2)]
    server.workers.extend(workers)
    c = sdk(server, retries=2)
    n = 3000
    batch_id = _submit(c, n)
    _wait_progress(c, batch_id, 400)
    workers[0].kill9()
    batch = wait(c, batch_id, timeout=90)
    assert batch.status == "completed", workers[1].output()[-2000:]
    out, err = _results(c, batch)
    assert not err
    _exactly_once(out, err, n)
    # The deployment's 32 in-flight slots are shared by both workers (cluster-wide limit): the
    # killed one had at most its share in flight, and only that may be sent again.
    assert _duplicates(upstream) <= 32
    assert upstream.stats()["max_in_flight"] <= 32
