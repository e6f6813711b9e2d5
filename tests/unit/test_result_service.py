"""ResultService on the in-memory store: the committed results of a batch as OpenAI lines,
in commit order, from a cursor, by outcome, and followed until the batch ends. The batch is
created through BatchService; its results are committed as checkpoints through the queue
store, and it is ended by the engine's finaliser."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batchd.errors import InvalidRequest
from batchd.models import CANCELLED, BatchRecord
from batchd.results.openai import openai_line
from batchd.results.record import decode, line_id
from batchd.service.results import ResultService, cursor_of
from tests.store_support import InMemory, commit_results, lines

LEASE = 30.0


@pytest.fixture
def svc(tmp_path: Path) -> InMemory:
    return InMemory(tmp_path)


def parsed(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def running(svc: InMemory) -> tuple[BatchRecord, list[bytes]]:
    """A batch of 5 lines (shards of 2, 2 and 1) with 4 results committed: shard 1's first
    (r-2 succeeded, r-3 failed: a 500), then shard 0's (both succeeded). The batch as
    stored and its records in commit order."""
    batch = await svc.create(lines(5, "r"))
    claims = await svc.store.queue.claim_shards("w", 3, time.time(), LEASE)
    records = await commit_results(svc.store.queue, svc.blobs, claims[1], [200, 500])
    records += await commit_results(svc.store.queue, svc.blobs, claims[0], [200, 200])
    rec = await svc.store.batches.get_batch(batch.id)
    assert rec is not None and (rec.completed, rec.failed) == (3, 1)
    return rec, records


async def test_a_pass_gives_every_committed_result_in_commit_order(svc: InMemory) -> None:
    batch, records = await running(svc)
    data = await read_all(svc.results.lines(batch))
    # the same bytes as the result files' lines, positions in commit order
    assert data == b"".join(openai_line(batch.id, i, decode(r)) for i, r in enumerate(records))
    got = parsed(data)
    assert [g["id"] for g in got] == [line_id(batch.id, i) for i in range(4)]
    assert [g["custom_id"] for g in got] == ["r-2", "r-3", "r-0", "r-1"]
    assert [g["response"]["status_code"] for g in got] == [200, 500, 200, 200]
    assert got[0]["response"]["body"] == {
        "n": 2,
        "usage": {"prompt_tokens": 2, "completion_tokens": 3},
    }


async def test_the_cursor_is_a_line_id_and_reading_resumes_after_it(svc: InMemory) -> None:
    batch, _ = await running(svc)
    first = parsed(await read_all(svc.results.lines(batch)))
    after = cursor_of(batch, first[1]["id"])
    assert after == 1
    rest = parsed(await read_all(svc.results.lines(batch, after=after)))
    assert rest == first[2:]
    assert await read_all(svc.results.lines(batch, after=3)) == b""
    assert cursor_of(batch, None) == cursor_of(batch, "") == -1
    assert cursor_of(batch, line_id(batch.id, batch.total - 1)) == batch.total - 1
    other = await svc.create(lines(1, "o"))
    past_the_end = line_id(batch.id, batch.total)  # a typo'd cursor would show nothing
    for bad in ("batch_req_nope", line_id(other.id, 0), first[1]["custom_id"], past_the_end):
        with pytest.raises(InvalidRequest) as err:
            cursor_of(batch, bad)
        assert err.value.param == "after"


async def test_the_outcome_filter_keeps_each_line_at_its_position(svc: InMemory) -> None:
    batch, _ = await running(svc)
    failed = parsed(await read_all(svc.results.lines(batch, outcome="failed")))
    assert [(g["id"], g["custom_id"]) for g in failed] == [(line_id(batch.id, 1), "r-3")]
    ok = parsed(await read_all(svc.results.lines(batch, outcome="succeeded")))
    assert [g["custom_id"] for g in ok] == ["r-2", "r-0", "r-1"]
    assert [g["id"] for g in ok] == [line_id(batch.id, i) for i in (0, 2, 3)]
    ok_after = parsed(await read_all(svc.results.lines(batch, after=1, outcome="succeeded")))
    assert ok_after == ok[1:]


class Gauge:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


async def next_lines(stream: AsyncIterator[bytes], n: int) -> list[dict[str, Any]]:
    """The next ``n`` lines of a followed stream (no more in the chunks that bring them)."""
    data = b""
    while data.count(b"\n") < n:
        data += await asyncio.wait_for(anext(stream), 30)
    return parsed(data)


async def test_follow_gives_each_result_as_it_is_committed_and_ends_with_the_batch(
    svc: InMemory,
) -> None:
    gauge = Gauge()  # the server's batchd_results_streams
    results = ResultService(
        svc.store.batches, svc.store.queue, svc.blobs, keepalive_seconds=3600, streams=gauge
    )
    batch = await svc.create(lines(5, "r"))
    claims = await svc.store.queue.claim_shards("w", 3, time.time(), LEASE)
    await commit_results(svc.store.queue, svc.blobs, claims[0], [200, 200])
    stream = results.lines(batch, follow=True)
    got = await next_lines(stream, 2)
    assert [g["custom_id"] for g in got] == ["r-0", "r-1"] and gauge.value == 1
    # committed while the stream waits: given at the next poll
    await commit_results(svc.store.queue, svc.blobs, claims[1], [200])
    got += await next_lines(stream, 1)
    await commit_results(svc.store.queue, svc.blobs, claims[1], [404], first=1, seq=2)
    got += await next_lines(stream, 1)
    assert [g["custom_id"] for g in got] == ["r-0", "r-1", "r-2", "r-3"]
    # cancelled: the last shard is given back unrun, and the finaliser ends the batch with
    # a cancelled record for its line, the last the stream gives before it ends
    await svc.batches.cancel("p", batch.id)
    assert await svc.store.queue.release_shard(claims[2], 0)
    ended = await svc.finalise(time.time())
    assert (ended.status, ended.completed, ended.failed) == (CANCELLED, 3, 2)
    rest = parsed(await asyncio.wait_for(read_all(stream), 30))
    assert [(g["id"], g["custom_id"]) for g in rest] == [(line_id(batch.id, 4), "r-4")]
    assert rest[0]["error"]["code"] == "batch_cancelled"
    assert gauge.value == 0
    # following an ended batch reads once and ends
    again = parsed(await asyncio.wait_for(read_all(results.lines(ended, follow=True)), 30))
    assert [g["id"] for g in again] == [line_id(batch.id, i) for i in range(5)]
