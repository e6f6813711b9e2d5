"""Anthropic's Message Batches API, driven by the real ``anthropic`` SDK against ``batchd serve``.

The requests run on the fake upstream's chat completions (translated from Messages params);
results come back as Anthropic result lines, rendered from the batch's result files.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from tests.conftest import API_KEY, OTHER_KEY
from tests.support import Server, Upstream, message_requests, wait_ended


@pytest.fixture
def claude(server: Server) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    yield c
    c.close()


def requests(n: int, prefix: str = "r", **params: Any) -> list[dict[str, Any]]:
    return message_requests(n, prefix=prefix, **{"model": "gpt-4o", "max_tokens": 32, **params})


def test_full_flow_with_an_errored_line(
    claude: anthropic.Anthropic, upstream: Upstream, server: Server
) -> None:
    upstream.control(reject_content="bad-1")
    reqs = requests(4, system="Be brief.", temperature=0.5, stop_sequences=["###"])
    reqs[1]["custom_id"] = "bad-1"
    reqs[1]["params"]["messages"] = [
        {"role": "user", "content": [{"type": "text", "text": "bad-1"}]}
    ]
    created = claude.messages.batches.create(requests=reqs)
    assert created.id.startswith("msgbatch_")
    assert created.type == "message_batch"
    assert created.processing_status in ("in_progress", "ended")
    assert sum(created.request_counts.to_dict().values()) == 4
    assert created.expires_at.timestamp() - created.created_at.timestamp() == 86400

    ended = wait_ended(claude, created.id)
    counts = ended.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (0, 3, 1)
    assert (counts.canceled, counts.expired) == (0, 0)
    assert ended.ended_at is not None and ended.archived_at is None
    assert ended.results_url == f"{server.url}/v1/messages/batches/{created.id}/results"

    results = {r.custom_id: r.result for r in claude.messages.batches.results(created.id)}
    assert set(results) == {"r-0", "bad-1", "r-2", "r-3"}
    ok = results["r-2"]
    assert ok.type == "succeeded"
    assert ok.message.type == "message" and ok.message.role == "assistant"
    assert ok.message.model == "gpt-4o"
    assert [(b.type, b.text) for b in ok.message.content] == [("text", "echo: r-2")]
    assert ok.message.stop_reason == "end_turn" and ok.message.stop_sequence is None
    assert ok.message.usage.output_tokens == 3 and ok.message.usage.input_tokens >= 1
    bad = results["bad-1"]
    assert bad.type == "errored"
    assert bad.error.error.type == "invalid_request_error"
    assert bad.error.error.message == "This request was rejected."


def test_cancel_keeps_partial_results(claude: anthropic.Anthropic, upstream: Upstream) -> None:
    upstream.control(latency=0.4)
    created = claude.messages.batches.create(requests=requests(200, prefix="c"))
    deadline = time.time() + 30
    while claude.messages.batches.retrieve(created.id).request_counts.succeeded < 1:
        assert time.time() < deadline
        time.sleep(0.1)
    cancelling = claude.messages.batches.cancel(created.id)
    assert cancelling.processing_status in ("canceling", "ended")
    assert cancelling.cancel_initiated_at is not None
    ended = wait_ended(claude, created.id)
    counts = ended.request_counts
    assert counts.succeeded >= 1 and counts.canceled >= 1
    assert counts.succeeded + counts.canceled + counts.errored == 200
    kinds: dict[str, int] = {}
    for r in claude.messages.batches.results(created.id):
        kinds[r.result.type] = kinds.get(r.result.type, 0) + 1
    assert kinds == {"succeeded": counts.succeeded, "canceled": counts.canceled} | (
        {"errored": counts.errored} if counts.errored else {}
    )
    # Cancelling it again: a conflict, in the words of Anthropic's API (no OpenAI status).
    with pytest.raises(anthropic.ConflictError) as again:
        claude.messages.batches.cancel(created.id)
    assert again.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": f"Message batch {created.id} has ended: it can no longer be canceled.",
        },
    }


def test_list_pages_and_delete(claude: anthropic.Anthropic, server: Server) -> None:
    batches = claude.messages.batches
    ids = [batches.create(requests=requests(1, prefix=f"l{i}")).id for i in range(3)]
    first = claude.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2]
    assert first.has_more is True
    second = claude.messages.batches.list(limit=2, after_id=first.data[-1].id)
    assert second.data[0].id == ids[0]
    back = claude.messages.batches.list(limit=1, before_id=ids[0])
    assert [b.id for b in back.data] == [ids[1]]

    # Delete: only once ended; then gone for retrieve and list.
    wait_ended(claude, ids[0])
    deleted = claude.messages.batches.delete(ids[0])
    assert (deleted.id, deleted.type) == (ids[0], "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.batches.retrieve(ids[0])
    assert err.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert ids[0] not in [b.id for b in claude.messages.batches.list(limit=100).data]


def test_keys_and_projects(server: Server, claude: anthropic.Anthropic) -> None:
    created = claude.messages.batches.create(requests=requests(1, prefix="k"))
    other = anthropic.Anthropic(base_url=server.url, api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        other.messages.batches.retrieve(created.id)
    bad = anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.batches.list()
    assert err.value.body == {  # Anthropic's envelope
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }
    # Authorization: Bearer names the same project as x-api-key.
    req = urllib.request.Request(
        f"{server.url}/v1/messages/batches/{created.id}",
        headers={"authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["id"] == created.id
    # No key: the error names Anthropic's header first.
    req = urllib.request.Request(f"{server.url}/v1/messages/batches/{created.id}")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(req, timeout=10)
    assert missing.value.code == 401
    assert json.loads(missing.value.read())["error"] == {
        "type": "authentication_error",
        "message": "Missing API key: send it as 'x-api-key: KEY' or 'Authorization: Bearer KEY'.",
    }
    other.close()
    bad.close()


@pytest.mark.parametrize(
    ("reqs", "message"),
    [
        ([], "requests: expected a non-empty list."),
        (
            [{"custom_id": "a b", "params": {}}],
            "requests.0.custom_id: 1 to 64 letters, digits, '_' or '-'.",
        ),
        (
            requests(1) + requests(1),
            "requests.1.custom_id: 'r-0' is used more than once.",
        ),
        (
            [{"custom_id": "x", "params": {"model": "gpt-4o", "messages": []}}],
            "requests.0.params.max_tokens: expected an integer of at least 1.",
        ),
        (
            requests(1, thinking={"type": "enabled", "budget_tokens": 1024}),
            "requests.0.params.thinking: not supported by batchd's Message Batches.",
        ),
        (
            [{"custom_id": "m", "params": {**requests(1)[0]["params"], "model": "nope"}}],
            "requests.0.params.model: no deployment serves the model 'nope'.",
        ),
    ],
)
def test_bad_input_is_an_anthropic_error(
    claude: anthropic.Anthropic, reqs: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.batches.create(requests=reqs)  # type: ignore[arg-type]
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == message
    assert err.value.response.headers["x-should-retry"] == "false"


def test_a_batch_over_the_token_quota_reports_every_request_errored(
    make_server: Any, upstream: Upstream
) -> None:
    """The quota is counted after the create has answered: the batch then ends with each
    request ``errored``, naming the reason (not silently with zero counts)."""
    from tests.conftest import base_config

    server = make_server(
        base_config(upstream, projects={"team-a": {"enqueued_token_limit": 50}})
    )
    client = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    try:
        batch = client.messages.batches.create(requests=requests(3, max_tokens=100))  # type: ignore[arg-type]
        ended = wait_ended(client, batch.id)
        counts = ended.request_counts
        assert (counts.errored, counts.succeeded, counts.processing) == (3, 0, 0)
        results = list(client.messages.batches.results(batch.id))
        assert sorted(r.custom_id for r in results) == ["r-0", "r-1", "r-2"]
        for r in results:
            assert r.result.type == "errored"
            assert "token limit" in r.result.error.error.message.lower()  # type: ignore[union-attr]
    finally:
        client.close()


def test_a_wrong_method_names_the_allowed_ones(server: Server) -> None:
    """405 on Anthropic's routes: `Allow` and the message list the methods, in its envelope."""
    for method, path, allowed in (
        ("PUT", "/v1/messages/batches", {"GET", "POST"}),
        ("GET", "/v1/messages/batches/msgbatch_x/cancel", {"POST"}),
        ("PATCH", "/v1/messages/batches/msgbatch_x", {"GET", "DELETE"}),
    ):
        req = urllib.request.Request(
            server.url + path, method=method, headers={"x-api-key": API_KEY}
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 405
        allow = {m.strip() for m in err.value.headers["allow"].split(",")}
        assert allowed <= allow, (path, allow)
        body = json.loads(err.value.read())
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert all(m in body["error"]["message"] for m in allowed), body
