"""Scale-out: two API replicas and three workers on one PostgreSQL and one S3-compatible
server. Files go in through one replica and come out through the other; two workers die
with ``kill -9`` mid-batch while a client follows its results through the other replica; a
cancel through the other replica stops a running batch."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.contract.test_results_stream import Follower
from tests.support import (
    S3_ENV,
    Proc,
    Server,
    Upstream,
    chat_lines,
    read_jsonl,
    start_server,
    start_upstream,
    start_worker,
    wait_batch,
    write_config,
)

KEY = "sk-cluster"
LIMIT = 8  # the deployment's max_concurrency, for the whole cluster
LATENCY = 0.1


class Cluster:
    def __init__(self, tmp: Path, database_url: str, s3_endpoint: str, upstream: Upstream) -> None:
        self.tmp = tmp
        self.base: dict[str, Any] = {
            "database_url": database_url,
            "files_url": "s3://batchd-cluster/files",
            "s3": {
                "endpoint_url": s3_endpoint,
                "access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
                "secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
                "region": S3_ENV["AWS_DEFAULT_REGION"],
            },
            "auth": {"keys": {KEY: "team-a"}},
            "deployments": [
                {"model": "gpt-4o", "base_url": upstream.v1, "max_concurrency": LIMIT},
            ],
            "engine": {"embedded": False, "lease_seconds": 3.0, "checkpoint_seconds": 0.2,
                       "cancel_grace_seconds": 1.0, "poll_seconds": 0.1, "shard_lines": 40},
        }
        self.servers: list[Server] = []
        self.workers: list[Proc] = []

    def config(self, name: str, data_dir: str) -> Path:
        return write_config(self.tmp, {**self.base, "data_dir": str(self.tmp / data_dir)},
                            f"{name}.toml")

    def start(self) -> None:
        for i in range(2):
            self.servers.append(start_server(self.config(f"serve{i}", f"serve{i}"), self.tmp))
        # The workers share a machine (and so a spool): one that takes over a killed worker's
        # shard adopts the results it had received but not yet checkpointed.
        workers = self.config("worker", "workers")
        for i in range(3):
            self.workers.append(start_worker(workers, self.tmp, i))

    def client(self, i: int) -> OpenAI:
        return OpenAI(base_url=self.servers[i].url + "/v1", api_key=KEY, max_retries=2)

    def stop(self) -> None:
        for p in [*self.workers, *(s.proc for s in self.servers)]:
            p.stop()

    def logs(self) -> str:
        return "\n".join(p.output()[-2000:] for p in [*self.workers,
                                                      *(s.proc for s in self.servers)])


@pytest.fixture
def cluster(tmp_path: Path, cluster_database: str, s3_server: str) -> Iterator[Cluster]:
    upstream = start_upstream(tmp_path, latency=LATENCY)
    c = Cluster(tmp_path, cluster_database, s3_server, upstream)
    c.upstream = upstream  # type: ignore[attr-defined]
    try:
        c.start()
        yield c
    finally:
        c.stop()
        upstream.proc.stop()


def submit(client: OpenAI, n: int, prefix: str) -> str:
    f = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(n, prefix=prefix))),
                            purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    return b.id


def results(client: OpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = read_jsonl(client.files.content(batch.output_file_id).text) \
        if batch.output_file_id else []
    err = read_jsonl(client.files.content(batch.error_file_id).text) \
        if batch.error_file_id else []
    return out, err


def wait_completed(client: OpenAI, batch_id: str, at_least: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while client.batches.retrieve(batch_id).request_counts.completed < at_least:  # type: ignore[union-attr]
        assert time.time() < deadline, f"batch {batch_id} made no progress"
        time.sleep(0.1)


def test_cluster_survives_kill9_and_cancels_across_replicas(cluster: Cluster) -> None:
    upstream: Upstream = cluster.upstream  # type: ignore[attr-defined]
    a, b = cluster.client(0), cluster.client(1)
    n = 480
    batch_id = submit(a, n, "kill")
    followed = Follower(cluster.servers[1], batch_id, key=KEY)  # results while it runs
    wait_completed(b, batch_id, 100)  # request_counts are current on the other replica
    for w in cluster.workers[:2]:
        w.kill9()
    batch = wait_batch(b, batch_id, timeout=45)
    assert batch.status == "completed", cluster.logs()
    out, err = results(b, batch)
    ids = Counter(r["custom_id"] for r in out + err)
    assert sorted(ids) == sorted(f"kill-{i}" for i in range(n))
    assert set(ids.values()) == {1}, "a custom_id appeared more than once"
    assert not err and batch.request_counts.completed == n  # type: ignore[union-attr]
    # The stream followed through the other replica had each result once, as in the file.
    assert followed.wait(timeout=30) == out

    stats = upstream.stats()
    duplicates = sum(c - 1 for c in stats["answered"].values())
    assert stats["max_in_flight"] <= LIMIT, stats["max_in_flight"]
    assert duplicates <= LIMIT, f"{duplicates} requests re-sent; at most {LIMIT} were in flight"

    # A cancel through replica b reaches the surviving worker; partial results are kept.
    m = 800
    cancel_id = submit(a, m, "cancel")
    wait_completed(b, cancel_id, 40)
    asked = time.time()
    assert b.batches.cancel(cancel_id).status in ("cancelling", "cancelled")
    cancelled = wait_batch(a, cancel_id, timeout=10, statuses=("cancelled",))
    assert time.time() - asked < 10
    out, err = results(a, cancelled)
    counts = cancelled.request_counts
    assert counts is not None and counts.completed >= 40 and counts.completed < m
    assert len(out) == counts.completed
    assert {r["error"]["code"] for r in err if r.get("error")} <= {"batch_cancelled"}
    assert Counter(r["custom_id"] for r in out + err) == Counter(f"cancel-{i}" for i in range(m))
    assert upstream.stats()["max_in_flight"] <= LIMIT
