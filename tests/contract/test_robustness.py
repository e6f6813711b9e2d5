"""One bad line, upstream answer or batch never stalls, loses or corrupts anything else
(docs/reliability.md): every case with the value it must give."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import API_KEY, OTHER_KEY, base_config
from tests.support import Server, Upstream, chat_lines, wait_batch

ATTEMPTS = 3


def strict_lines(data: bytes) -> list[dict[str, Any]]:
    """Every line valid UTF-8 JSON (no replacement on read): what every file must hold."""
    return [json.loads(line.decode("utf-8")) for line in data.splitlines() if line.strip()]


def submit(c: OpenAI, data: bytes, window: str = "24h") -> Any:
    file = c.files.create(file=("in.jsonl", data), purpose="batch")
    return c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window=window
    )


def chat(cid: str, text: str, model: str = "gpt-4o") -> bytes:
    row = {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}]},
    }
    return json.dumps(row).encode() + b"\n"


@pytest.fixture
def robust(make_server: Callable[..., Server], upstream: Upstream) -> Server:
    deployments = [
        {
            "model": "gpt-4o",
            "base_url": upstream.v1,
            "max_concurrency": 16,
            "max_attempts": ATTEMPTS,
            "timeout": 1.0,
        },
        {"model": "limited", "base_url": upstream.v1, "max_concurrency": 16},
    ]
    engine = {"max_shards": 2, "shard_lines": 1}
    return make_server(base_config(upstream, deployments=deployments, engine=engine))


BEHAVIOURS = {
    # prompt -> (where it must end, its status, the error code or a check of the body)
    "html_500": ("err", 500, None),
    "non_json_2xx": ("err", 502, "invalid_upstream_response"),
    "truncated": ("err", 502, "upstream_unreachable"),
    "nested": ("err", 502, "invalid_upstream_response"),
    "always_500": ("err", 500, None),
    "never_answer": ("err", 504, "upstream_timeout"),
    "invalid_utf8": ("out", 200, None),
    "null_usage": ("out", 200, None),
}


def test_upstream_misbehaviours_end_each_line_once(
    robust: Server, upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    """Each odd answer ends its own line (retried at most max_attempts times), the good
    lines run, the batch completes (never waits for its deadline), every line parses."""
    upstream.control(misbehave={k: k for k in BEHAVIOURS})
    c = sdk(robust)
    data = b"".join(chat(f"good-{i}", f"fine {i}") for i in range(4))
    data += b"".join(chat(name, name) for name in BEHAVIOURS)
    batch = wait_batch(c, submit(c, data).id, timeout=90)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 12
    assert (batch.request_counts.completed, batch.request_counts.failed) == (6, 6)
    out = strict_lines(c.files.content(batch.output_file_id).content)
    err = strict_lines(c.files.content(batch.error_file_id).content)
    ids = [r["custom_id"] for r in out + err]
    assert sorted(ids) == sorted([f"good-{i}" for i in range(4)] + list(BEHAVIOURS))
    by_id = {r["custom_id"]: r for r in out + err}
    for name, (where, status, code) in BEHAVIOURS.items():
        row = by_id[name]
        assert (row in out) == (where == "out"), name
        assert row["response"]["status_code"] == status, (name, row)
        if code is not None:
            assert row["response"]["body"]["error"]["code"] == code, (name, row)
    # the model's answer is kept, its invalid UTF-8 repaired
    content = by_id["invalid_utf8"]["response"]["body"]["choices"][0]["message"]["content"]
    assert content == "echo: \ufffd\ufffd invalid_utf8"
    assert "502 Bad Gateway" in by_id["html_500"]["response"]["body"]["error"]["message"]
    # usage read leniently: null details and floats count as what they are
    assert batch.usage.input_tokens >= 7 and batch.usage.output_tokens >= 3 * 5
    attempts = upstream.stats()["attempts"]
    for name in ("always_500", "html_500", "truncated", "never_answer"):
        assert attempts[name] == ATTEMPTS, (name, attempts)
    for name in ("non_json_2xx", "nested", "invalid_utf8", "null_usage"):
        assert attempts[name] == 1, (name, attempts)


def test_rate_limited_batch_does_not_block_another_project(
    robust: Server, upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    """Project A's batch gets 429 with retry-after: 3600 on every line: its shards park
    (the deployment pauses) and hold nothing; project B's small batch on a healthy
    deployment finishes meanwhile; cancelling A ends it within seconds, every line once."""
    upstream.control(misbehave={"model=limited": "retry_after_long"})
    a, b = sdk(robust, key=API_KEY), sdk(robust, key=OTHER_KEY)
    limited = submit(a, b"".join(chat(f"a-{i}", f"a {i}", model="limited") for i in range(6)))
    time.sleep(1.0)  # A's shards (max_shards = 2) are claimed first
    started = time.time()
    small = wait_batch(b, submit(b, chat_lines(5, prefix="b")).id, timeout=30)
    assert small.status == "completed" and small.request_counts.completed == 5
    assert time.time() - started < 15
    assert a.batches.retrieve(limited.id).status == "in_progress"
    # the pause holds for the whole deployment: not one request per line and shard
    assert sum(v for k, v in upstream.stats()["attempts"].items() if k.startswith("a ")) <= 2
    a.batches.cancel(limited.id)
    started = time.time()
    ended = wait_batch(a, limited.id, timeout=20)
    assert ended.status == "cancelled" and time.time() - started < 10
    err = strict_lines(a.files.content(ended.error_file_id).content)
    assert sorted(r["custom_id"] for r in err) == [f"a-{i}" for i in range(6)]
    assert {r["error"]["code"] for r in err} == {"batch_cancelled"}


def test_result_file_ids_only_once_readable(
    robust: Server, upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    """While a batch runs or finalises, its output_file_id and error_file_id are null; once
    it has ended, both (where they exist) can be read."""
    upstream.control(latency=0.05, reject_content="bad")
    c = sdk(robust)
    data = chat_lines(30) + chat("bad-1", "bad")
    batch = submit(c, data)
    seen: set[str] = set()
    while True:
        b = c.batches.retrieve(batch.id)
        seen.add(b.status)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            break
        assert (b.output_file_id, b.error_file_id) == (None, None), b
    assert b.status == "completed" and "in_progress" in seen
    assert len(strict_lines(c.files.content(b.output_file_id).content)) == 30
    assert [r["custom_id"] for r in strict_lines(c.files.content(b.error_file_id).content)] == [
        "bad-1"
    ]
