"""Result line ids are cursors (issue 14): ``batch_req_<batch id without "batch_">_<pos>``
where the positions of a batch's output and error lines together are 0..n-1 in the order
the results were committed, with the files in position order, cancelled requests last."""

from __future__ import annotations

import time

from openai import OpenAI

from batchd.results.record import position_of
from tests.support import Upstream, chat_lines, read_jsonl, wait_batch


def _positions(client: OpenAI, batch_id: str, file_id: str | None) -> list[int]:
    if file_id is None:
        return []
    rows = read_jsonl(client.files.content(file_id).text)
    got = [position_of(batch_id, r["id"]) for r in rows]
    assert None not in got
    return [p for p in got if p is not None]


def test_ids_are_positions_in_commit_order(client: OpenAI, upstream: Upstream) -> None:
    upstream.control(reject_content="req-3")
    f = client.files.create(file=("in.jsonl", chat_lines(12)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(client, batch.id)
    assert done.status == "completed"
    out = _positions(client, batch.id, done.output_file_id)
    err = _positions(client, batch.id, done.error_file_id)
    assert out == sorted(out) and err == sorted(err)  # each file in position order
    assert sorted(out + err) == list(range(12)) and len(err) == 1


def test_cancelled_requests_come_after_every_executed_one(
    client: OpenAI, upstream: Upstream
) -> None:
    upstream.control(latency=0.3)
    f = client.files.create(file=("in.jsonl", chat_lines(300)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.time() + 30
    while (client.batches.retrieve(batch.id).request_counts or _none()).completed < 1:
        assert time.time() < deadline
        time.sleep(0.1)
    client.batches.cancel(batch.id)
    done = wait_batch(client, batch.id)
    assert done.status == "cancelled" and done.error_file_id
    out = _positions(client, batch.id, done.output_file_id)
    rows = read_jsonl(client.files.content(done.error_file_id).text)
    cancelled = [
        position_of(batch.id, r["id"]) for r in rows
        if r["error"] and r["error"]["code"] == "batch_cancelled"
    ]
    assert cancelled and min(p for p in cancelled if p is not None) > max(out)
    assert sorted(out + _positions(client, batch.id, done.error_file_id)) == list(range(300))


def _none() -> object:
    class Zero:
        completed = 0

    return Zero()
