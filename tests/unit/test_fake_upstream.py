"""The fake upstream's capacity model answers as a loaded model server does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from batchd.backends.http1 import HTTP1Backend
from tests.support import Upstream, start_upstream


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    up = start_upstream(tmp_path_factory.mktemp("cap"))
    yield up
    up.proc.stop()


async def test_capacity_queue_and_429(upstream: Upstream) -> None:
    upstream.control(capacity=2, latency=0.2, queue_limit=2)
    backend = HTTP1Backend(upstream.v1, api_key=None, max_concurrency=16)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'

    async def one() -> tuple[int, float]:
        started = time.monotonic()
        r = await backend.send("/v1/chat/completions", body, time_limit=5)
        return r.status_code, time.monotonic() - started

    try:
        results = await asyncio.gather(*[one() for _ in range(6)])
    finally:
        upstream.control(capacity=0, latency=0.0, queue_limit=1_000_000)
        await backend.close()
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200, 200, 200, 429, 429]
    served = sorted(t for s, t in results if s == 200)
    assert served[1] < 0.35 and served[2] >= 0.38  # two at once, then the queued two
    assert max(t for s, t in results if s == 429) < 0.15  # refused at once
