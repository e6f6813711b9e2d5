"""The fake upstream's capacity model answers as a loaded model server does, and its
``/v1/messages`` as Anthropic's API does."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
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


def _messages(
    upstream: Upstream, body: dict[str, object], **headers: str
) -> tuple[int, dict[str, str], dict[str, object]]:
    """POST /v1/messages; a header given as "" is left out."""
    hdrs = {
        "content-type": "application/json", "x-api-key": "k", "anthropic-version": "2023-06-01"
    }
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    req = urllib.request.Request(
        upstream.v1 + "/messages", data=json.dumps(body).encode(),
        headers={k: v for k, v in hdrs.items() if v}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


ASK = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def test_messages_answer_as_anthropic_does(upstream: Upstream) -> None:
    upstream.reset()
    status, headers, msg = _messages(upstream, ASK)
    assert status == 200 and headers["request-id"].startswith("req_")
    assert str(msg["id"]).startswith("msg_")
    assert {k: v for k, v in msg.items() if k != "id"} == {
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [{"type": "text", "text": "echo: hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 3, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
    }
    _, _, cut = _messages(upstream, {**ASK, "stop_sequences": ["o: h"]})
    assert (cut["content"], cut["stop_reason"], cut["stop_sequence"]) == (
        [{"type": "text", "text": "ech"}], "stop_sequence", "o: h"
    )
    _, _, short = _messages(upstream, {**ASK, "max_tokens": 1})
    assert (short["stop_reason"], short["usage"]["output_tokens"]) == ("max_tokens", 1)  # type: ignore[index]
    assert upstream.stats()["message_headers"] == {"x-api-key: k": 3,
                                                   "anthropic-version: 2023-06-01": 3}


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        (ASK, {"x_api_key": ""}, 401, ("authentication_error", "x-api-key header is required")),
        (ASK, {"anthropic_version": ""}, 400,
         ("invalid_request_error", "anthropic-version: header is required")),
        ({**ASK, "n": 2}, {}, 400, ("invalid_request_error", "n: Extra inputs are not permitted")),
        ({"model": "c", "messages": []}, {}, 400,
         ("invalid_request_error", "max_tokens: Field required")),
    ],
)
def test_messages_refusals_have_anthropics_shape(
    upstream: Upstream, body: dict[str, object], headers: dict[str, str], status: int,
    error: tuple[str, str],
) -> None:
    got, _, doc = _messages(upstream, body, **headers)
    assert got == status
    assert doc == {"type": "error", "error": {"type": error[0], "message": error[1]}}


def test_messages_switches_answer_in_anthropics_shape(upstream: Upstream) -> None:
    upstream.control(fail_rate=1.0)
    try:
        assert _messages(upstream, ASK)[0::2] == (
            500,
            {"type": "error",
             "error": {"type": "api_error", "message": "The server had an error."}},
        )
        upstream.control(fail_rate=0.0, rate_limit_rate=1.0, retry_after=2)
        status, headers, doc = _messages(upstream, ASK)
        assert (status, headers["retry-after"], doc["error"]) == (  # type: ignore[index]
            429, "2", {"type": "rate_limit_error", "message": "Rate limit reached."}
        )
        upstream.control(rate_limit_rate=0.0, misbehave={"hi": "overloaded"})
        assert _messages(upstream, ASK)[0::2] == (
            529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )
    finally:
        upstream.control(fail_rate=0.0, rate_limit_rate=0.0, retry_after=0.05, misbehave={})
