"""An upstream answer over ``deployments.max_response_bytes`` ends as an error line that
names the limit, while the answers within it are kept (issue 10)."""

from __future__ import annotations

import json
from collections.abc import Callable

from openai import OpenAI

from tests.conftest import base_config
from tests.support import Server, Upstream, read_jsonl, wait_batch


def test_answer_over_the_cap_is_a_clear_error_line(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    cfg = base_config(upstream)
    cfg["deployments"][0].update(max_response_bytes=4096, max_attempts=2)
    client = sdk(make_server(cfg))
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]},
        }
        for cid, text in (("small", "hello"), ("big", "x" * 8000))
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    b = wait_batch(client, b.id, timeout=60)
    assert b.status == "completed", b
    assert b.request_counts is not None
    assert (b.request_counts.completed, b.request_counts.failed) == (1, 1)
    out = read_jsonl(client.files.content(b.output_file_id).text)
    assert [r["custom_id"] for r in out] == ["small"]
    (err,) = read_jsonl(client.files.content(b.error_file_id).text)
    assert err["custom_id"] == "big"
    message = err["response"]["body"]["error"]["message"]
    assert "larger than 4096 bytes" in message and "max_response_bytes" in message
