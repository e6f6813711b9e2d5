"""Message batches on an upstream that speaks Anthropic's ``/v1/messages`` itself
(``api_style = "anthropic"``), driven by the real ``anthropic`` and ``openai`` SDKs against
``batchd serve`` (and ``batchd worker`` processes), the fake upstream as the model server.

The params pass through unchanged, the upstream's Messages are the results as received, its
errors keep their type; a worker's ``kill -9`` and a cancel leave every custom_id once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import API_KEY, base_config
from tests.support import Server, Upstream, message_requests, start_worker, wait_ended

CLAUDE = "claude-test"
UPSTREAM_KEY = "sk-upstream-1"


def config(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    """The test config plus two Anthropic-speaking deployments: ``claude-test`` (the key as
    x-api-key, the default anthropic-version) and ``claude-pinned`` (a version of its own)."""
    cfg = base_config(upstream, **extra)
    cfg["deployments"] = [
        *cfg["deployments"],
        {
            "model": CLAUDE,
            "base_url": upstream.url,
            "api_style": "anthropic",
            "api_key": UPSTREAM_KEY,
            "max_concurrency": 16,
            "max_attempts": 2,
        },
        {
            "model": "claude-pinned",
            "base_url": upstream.v1,  # a base ending in /v1 works too
            "api_style": "anthropic",
            "api_key": UPSTREAM_KEY,
            "headers": {"anthropic-version": "2024-10-22"},
        },
    ]
    return cfg


@pytest.fixture
def served(
    make_server: Callable[..., Server], upstream: Upstream
) -> Iterator[tuple[Server, anthropic.Anthropic]]:
    server = make_server(config(upstream))
    client = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    yield server, client
    client.close()


def requests(n: int, prefix: str = "p", model: str = CLAUDE, **params: Any) -> list[Any]:
    return message_requests(n, prefix=prefix, **{"model": model, "max_tokens": 64, **params})


def wait_succeeded(client: anthropic.Anthropic, batch_id: str, at_least: int) -> None:
    deadline = time.time() + 60
    while client.messages.batches.retrieve(batch_id).request_counts.succeeded < at_least:
        assert time.time() < deadline, f"no progress on {batch_id}"
        time.sleep(0.05)


def raw_results(server: Server, batch_id: str) -> list[dict[str, Any]]:
    """The result lines as JSON, to compare with what the upstream sent byte for byte."""
    import urllib.request

    req = urllib.request.Request(
        f"{server.url}/v1/messages/batches/{batch_id}/results", headers={"x-api-key": API_KEY}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def test_params_pass_through_and_messages_come_back_as_received(
    served: tuple[Server, anthropic.Anthropic], upstream: Upstream
) -> None:
    server, claude = served
    upstream.control(misbehave={"p-overloaded": "overloaded"})
    reqs = requests(3, system="Be brief.", stop_sequences=["###"], top_k=5)
    reqs[2]["params"]["messages"] = [{"role": "user", "content": "cut here### not this"}]
    reqs += [
        # a param batchd does not translate: passed on, and refused by the upstream (400)
        {"custom_id": "p-bogus", "params": {**requests(1)[0]["params"], "bogus_param": 1}},
        # answered 529 overloaded_error on each of its 2 attempts
        {
            "custom_id": "p-overloaded",
            "params": {**requests(1)[0]["params"], "messages": [
                {"role": "user", "content": "p-overloaded"}
            ]},
        },
    ]
    created = claude.messages.batches.create(requests=reqs)
    ended = wait_ended(claude, created.id)
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored, counts.canceled, counts.expired) == (3, 2, 0, 0)

    results = {r.custom_id: r.result for r in claude.messages.batches.results(created.id)}
    assert sorted(results) == ["p-0", "p-1", "p-2", "p-bogus", "p-overloaded"]
    ok = results["p-0"]
    assert ok.type == "succeeded"
    assert ok.message.model == CLAUDE
    assert [(b.type, b.text) for b in ok.message.content] == [("text", "echo: p-0")]
    assert ok.message.stop_reason == "end_turn"
    assert (ok.message.usage.input_tokens, ok.message.usage.output_tokens) == (1, 3)
    cut = results["p-2"]
    assert cut.type == "succeeded"
    assert [b.text for b in cut.message.content] == ["echo: cut here"]
    assert (cut.message.stop_reason, cut.message.stop_sequence) == ("stop_sequence", "###")
    bogus = results["p-bogus"]
    assert bogus.type == "errored"
    assert bogus.error.error.type == "invalid_request_error"
    assert bogus.error.error.message == "bogus_param: Extra inputs are not permitted"
    busy = results["p-overloaded"]
    assert busy.type == "errored"
    assert busy.error.error.type == "overloaded_error"
    assert busy.error.error.message == "Overloaded"

    # As received: each result's message is the upstream's answer in the batch's output file
    # (the OpenAI view of the same batch), not a message rebuilt by batchd.
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    try:
        batch = oai.batches.retrieve("batch_" + created.id.removeprefix("msgbatch_"))
        assert batch.endpoint == "/v1/messages"
        assert batch.output_file_id is not None
        out = oai.files.content(batch.output_file_id).text
        inputs = oai.files.content(batch.input_file_id).text
    finally:
        oai.close()
    bodies = {
        line["custom_id"]: line["response"]["body"]
        for line in map(json.loads, out.splitlines())
    }
    raw = {line["custom_id"]: line["result"] for line in raw_results(server, created.id)}
    for cid in ("p-0", "p-1", "p-2"):
        assert raw[cid] == {"type": "succeeded", "message": bodies[cid]}
        assert bodies[cid]["id"].startswith("msg_") and bodies[cid]["type"] == "message"
    # ... and the params went out unchanged, as the batch's /v1/messages input lines.
    sent = {line["custom_id"]: line for line in map(json.loads, inputs.splitlines())}
    for item in reqs:
        line = sent[item["custom_id"]]
        assert (line["url"], line["body"]) == ("/v1/messages", item["params"])

    stats = upstream.stats()
    tries = 3 + 1 + 2  # the 529 was tried max_attempts = 2 times
    assert stats["message_headers"] == {
        f"x-api-key: {UPSTREAM_KEY}": tries,
        "anthropic-version: 2023-06-01": tries,
    }
    assert stats["status"] == {"200": 3, "400": 1, "529": 2}


def test_deployment_headers_name_the_version(
    served: tuple[Server, anthropic.Anthropic], upstream: Upstream
) -> None:
    _, claude = served
    created = claude.messages.batches.create(requests=requests(2, model="claude-pinned"))
    ended = wait_ended(claude, created.id)
    assert ended.request_counts.succeeded == 2
    assert upstream.stats()["message_headers"] == {
        f"x-api-key: {UPSTREAM_KEY}": 2,
        "anthropic-version: 2024-10-22": 2,
    }


def test_what_an_anthropic_deployment_does_not_run(
    served: tuple[Server, anthropic.Anthropic], upstream: Upstream
) -> None:
    server, claude = served
    # A message batch does not stream (refused whole, naming the request).
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.batches.create(requests=requests(1, stream=True))
    assert err.value.body["error"]["message"] == (  # type: ignore[index]
        "requests.0.params.stream: a message batch does not stream; leave it out."
    )
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    try:
        line = {"custom_id": "m-0", "method": "POST", "url": "/v1/messages",
                "body": requests(1)[0]["params"]}
        f = oai.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
        # /v1/messages is a batch endpoint of message batches only, not of /v1/batches.
        with pytest.raises(openai.BadRequestError) as bad:
            oai.batches.create(
                input_file_id=f.id,
                endpoint="/v1/messages",  # type: ignore[arg-type]
                completion_window="24h",
            )
        assert bad.value.code == "invalid_value"
        assert "/v1/chat/completions" in bad.value.message
        # A chat completions batch for a model whose deployment speaks /v1/messages fails.
        chat = json.dumps(
            {
                "custom_id": "c-0",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}]},
            }
        ).encode()
        f2 = oai.files.create(file=("chat.jsonl", chat + b"\n"), purpose="batch")
        batch = oai.batches.create(
            input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.status == "failed"
        assert batch.errors is not None and batch.errors.data is not None
        (issue,) = batch.errors.data
        assert issue.code == "model_not_found" and issue.line == 1
        assert issue.message == (
            f"Line 1: the deployment of model {CLAUDE!r} speaks Anthropic's /v1/messages "
            "(api_style 'anthropic'): it runs message batches, not /v1/chat/completions."
        )
    finally:
        oai.close()
    assert upstream.stats()["requests"] == 0


@pytest.mark.parametrize("model", [CLAUDE, "gpt-4o"])
def test_cancel_leaves_each_custom_id_once(
    served: tuple[Server, anthropic.Anthropic], upstream: Upstream, model: str
) -> None:
    """Pass-through and translated alike: cancel mid-batch ends it with partial results."""
    _, claude = served
    upstream.control(latency=0.3)
    n = 150
    created = claude.messages.batches.create(requests=requests(n, prefix="c", model=model))
    wait_succeeded(claude, created.id, 1)
    cancelling = claude.messages.batches.cancel(created.id)
    assert cancelling.processing_status in ("canceling", "ended")
    assert cancelling.cancel_initiated_at is not None
    ended = wait_ended(claude, created.id)
    counts = ended.request_counts
    assert counts.processing == 0 and counts.errored == 0 and counts.expired == 0
    assert counts.succeeded >= 1 and counts.canceled >= 1
    assert counts.succeeded + counts.canceled == n
    results = list(claude.messages.batches.results(created.id))
    seen = Counter(r.custom_id for r in results)
    assert seen == Counter(f"c-{i}" for i in range(n))  # each once
    kinds = Counter(r.result.type for r in results)
    assert kinds == {"succeeded": counts.succeeded, "canceled": counts.canceled}
    for r in results:
        if r.result.type == "succeeded":
            assert [b.text for b in r.result.message.content] == [f"echo: {r.custom_id}"]  # type: ignore[union-attr]


def test_worker_kill9_mid_batch_then_takeover(
    make_server: Callable[..., Server], upstream: Upstream
) -> None:
    """A worker killed with SIGKILL mid-batch: the other takes its shards over; every
    custom_id is in the results exactly once, all succeeded, and only what was in flight
    may have been sent twice."""
    upstream.control(latency=0.02)
    server = make_server(config(upstream, engine={"embedded": False}))
    tmp = server.config_path.parent
    workers = [start_worker(server.config_path, tmp, i) for i in range(2)]
    server.workers.extend(workers)
    claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=2)
    try:
        n = 1200
        created = claude.messages.batches.create(requests=requests(n, prefix="k"))
        wait_succeeded(claude, created.id, 150)
        workers[0].kill9()
        mid = claude.messages.batches.retrieve(created.id)
        assert mid.processing_status == "in_progress" and mid.request_counts.succeeded < n
        ended = wait_ended(claude, created.id, timeout=120)
        counts = ended.request_counts
        assert (counts.succeeded, counts.errored, counts.canceled) == (n, 0, 0), (
            workers[1].output()[-2000:]
        )
        results = list(claude.messages.batches.results(created.id))
        assert Counter(r.custom_id for r in results) == Counter(f"k-{i}" for i in range(n))
        assert {r.result.type for r in results} == {"succeeded"}
        for r in results:
            assert [b.text for b in r.result.message.content] == [f"echo: {r.custom_id}"]  # type: ignore[union-attr]
    finally:
        claude.close()
    answered: dict[str, int] = upstream.stats()["answered"]
    assert sum(answered.values()) >= n
    # The deployment's 16 slots are shared by both workers: at most those were in flight.
    assert sum(k - 1 for k in answered.values() if k > 1) <= 16
