"""Fair shares: a small batch starts within seconds of its creation, whatever big batch
of another project (or of its own) fills the deployment; the big one keeps every slot nobody
else needs (docs/scheduling.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

from openai import OpenAI

from tests.conftest import API_KEY, OTHER_KEY, base_config
from tests.support import Server, Upstream, chat_lines, wait_batch


def submit(c: OpenAI, data: bytes) -> str:
    file = c.files.create(file=("in.jsonl", data), purpose="batch")
    batch = c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


def test_small_batches_do_not_wait_behind_a_big_one(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    upstream.control(latency=0.2)
    deployments = [{"model": "gpt-4o", "base_url": upstream.v1, "max_concurrency": 16}]
    engine = {"shard_lines": 100, "max_shards": 4}
    server = make_server(base_config(upstream, deployments=deployments, engine=engine))
    a, b = sdk(server, key=API_KEY), sdk(server, key=OTHER_KEY)
    big = submit(a, chat_lines(4000, prefix="big"))  # 50 s of work at 16 x 0.2 s
    deadline = time.time() + 20
    while a.batches.retrieve(big).request_counts.completed < 100:
        assert time.time() < deadline
        time.sleep(0.2)
    for client, prefix in ((b, "other"), (a, "mine")):
        started = time.time()
        small = wait_batch(client, submit(client, chat_lines(20, prefix=prefix)), timeout=30)
        took = time.time() - started
        assert small.status == "completed" and small.request_counts.completed == 20
        assert took < 15, (prefix, took)
    running = a.batches.retrieve(big)
    assert running.status == "in_progress" and running.request_counts.completed < 4000
    stats = upstream.stats()
    assert stats["max_in_flight"] <= 16  # the limit held while the slots were shared
    a.batches.cancel(big)
    assert wait_batch(a, big, timeout=20).status == "cancelled"


def test_a_new_batch_is_claimed_at_once_not_at_the_next_poll(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    """serve's API wakes its engine when a batch starts: with a 10 s idle poll, a batch
    still completes in about a second."""
    server = make_server(base_config(upstream, engine={"poll_seconds": 10.0}))
    c = sdk(server, key=API_KEY)
    time.sleep(1.5)  # the engine is up and idle, in its 10 s wait
    started = time.time()
    batch = wait_batch(c, submit(c, chat_lines(5)), timeout=30)
    assert batch.status == "completed"
    assert time.time() - started < 5
