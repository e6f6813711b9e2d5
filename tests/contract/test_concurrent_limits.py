"""Limits hold when requests arrive at once (issue 10): 200 concurrent uploads with
``max_files = 40`` leave exactly 40 files; batches created at the same moment cannot all
pass the enqueued-token quota."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from tests.conftest import base_config
from tests.contract.hostile import form, post_form
from tests.support import Server, Upstream, chat_lines, wait_batch


def test_200_concurrent_uploads_leave_exactly_max_files(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    server = make_server(base_config(upstream, limits={"max_files": 40}))
    body = form({"purpose": "batch"}, ("in.jsonl", chat_lines(3)))
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: post_form(server.url, body), range(200)))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 40 + [400] * 160
    assert {a.error["code"] for a in answers if a.status == 400} == {"quota_exceeded"}
    listed = sdk(server).files.list().data
    assert len(listed) == 40
    inputs = sorted(p.name for p in (server.data_dir / "files" / "inputs").iterdir())
    assert inputs == sorted(f.id for f in listed)  # no blob left by a refused upload


def test_concurrent_creates_cannot_all_pass_the_token_quota(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    """Each batch needs a little over 1,000 tokens (its max_tokens); the quota is 2,500:
    of ten created at once, exactly two run and eight fail with token_limit_exceeded."""
    cfg = base_config(upstream)
    cfg["deployments"][0]["enqueued_token_limit"] = 2500
    server = make_server(cfg)
    upstream.control(latency=60.0)  # the two that run stay unfinished (enqueued)
    client = sdk(server)
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o", "messages": [], "max_tokens": 1000},
    }
    files = [
        client.files.create(file=(f"{i}.jsonl", json.dumps(line).encode()), purpose="batch").id
        for i in range(10)
    ]

    def create(file_id: str) -> str:
        c = sdk(server)
        return c.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id

    with ThreadPoolExecutor(10) as pool:
        ids = list(pool.map(create, files))
    ended = [
        wait_batch(client, i, timeout=20, statuses=("in_progress", "failed", "completed"))
        for i in ids
    ]
    assert sorted(b.status for b in ended) == ["failed"] * 8 + ["in_progress"] * 2
    for b in ended:
        if b.status == "failed":
            assert [e.code for e in b.errors.data] == ["token_limit_exceeded"]
    for b in ended:
        if b.status == "in_progress":
            client.batches.cancel(b.id)
