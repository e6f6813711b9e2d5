"""Content filtering (``[content_filter]``) and ``/v1/moderations`` batches, through the
openai SDK against a real ``batchd serve``: the embedded classifier offline (annotate and
block), a moderation server and a guard model as the classifier (the fake upstream's), and
a moderations batch on the embedded defaults."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openai import AzureOpenAI, OpenAI
from openai.types import ModerationCreateResponse
from openai.types.chat import ChatCompletion

from batchd.localmodel.packages import MINILM
from tests.conftest import API_KEY, base_config
from tests.support import Server, Upstream, read_jsonl, wait_batch
from tests.unit.localmodel_support import weights_dir

CATEGORIES = ("hate", "self_harm", "sexual", "violence")
SAFE = {c: {"filtered": False, "severity": "safe"} for c in CATEGORIES}
CAPITAL = "What is the capital of France?"
THREAT = "I am going to kill you tomorrow, I know where you live."


@pytest.fixture(autouse=True)
def _minilm() -> None:
    weights_dir(MINILM)  # skips, naming the package, when the weights are not installed


def _chat(cid: str, text: str, model: str = "gpt-4o") -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}]},
    }


def _run(
    client: OpenAI | AzureOpenAI, rows: list[dict[str, Any]], endpoint: str, timeout: float = 60
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(batch, output lines by custom_id, error lines by custom_id)."""
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    file = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint=endpoint, completion_window="24h"  # type: ignore[arg-type]
    )
    batch = wait_batch(client, batch.id, timeout=timeout)
    assert batch.status == "completed", batch

    def lines(file_id: str | None) -> dict[str, Any]:
        if not file_id:
            return {}
        return {r["custom_id"]: r for r in read_jsonl(client.files.content(file_id).text)}

    return batch, lines(batch.output_file_id), lines(batch.error_file_id)


def _results(obj: dict[str, Any]) -> dict[str, Any]:
    assert set(obj) == set(CATEGORIES)
    for value in obj.values():
        assert set(value) == {"filtered", "severity"}
    return obj


@pytest.fixture
def cf_server(make_server: Callable[..., Server], upstream: Upstream) -> Callable[..., Server]:
    def make(**content_filter: Any) -> Server:
        extra: dict[str, Any] = {}
        deployments = content_filter.pop("deployments", None)
        if deployments:
            extra["deployments"] = base_config(upstream)["deployments"] + deployments
        return make_server(
            base_config(upstream, content_filter={"enabled": True, **content_filter}, **extra)
        )

    return make


def test_annotate_offline(
    cf_server: Callable[..., Server], sdk: Callable[..., OpenAI], upstream: Upstream
) -> None:
    c = sdk(cf_server())
    _, out, err = _run(c, [_chat("safe", CAPITAL), _chat("threat", THREAT)], "/v1/chat/completions")
    assert err == {}
    safe = out["safe"]["response"]["body"]
    assert safe["prompt_filter_results"] == [{"prompt_index": 0, "content_filter_results": SAFE}]
    assert safe["choices"][0]["content_filter_results"] == SAFE
    assert safe["choices"][0]["message"]["content"] == f"echo: {CAPITAL}"  # kept as answered
    threat = out["threat"]["response"]["body"]
    prompt = threat["prompt_filter_results"][0]["content_filter_results"]
    assert _results(prompt)["violence"] == {"filtered": True, "severity": "high"}
    assert {c: prompt[c] for c in ("hate", "sexual")} == {c: SAFE[c] for c in ("hate", "sexual")}
    choice = threat["choices"][0]
    assert _results(choice["content_filter_results"])["violence"]["filtered"] is True
    assert choice["finish_reason"] == "stop"  # annotate never withholds
    assert choice["message"]["content"] == f"echo: {THREAT}"
    parsed = ChatCompletion.model_validate(threat)  # still the SDK's type
    assert parsed.usage is not None and parsed.usage.total_tokens > 0
    # annotate sends everything upstream
    assert upstream.stats()["attempts"] == {CAPITAL: 1, THREAT: 1}

    # completions: one prompt_filter_results entry a prompt
    rows = [
        {
            "custom_id": "two-prompts",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "gpt-4o", "prompt": [CAPITAL, THREAT]},
        }
    ]
    _, out, _ = _run(c, rows, "/v1/completions")
    body = out["two-prompts"]["response"]["body"]
    prompts = body["prompt_filter_results"]
    assert [p["prompt_index"] for p in prompts] == [0, 1]
    assert prompts[0]["content_filter_results"] == SAFE
    assert _results(prompts[1]["content_filter_results"])["violence"]["filtered"] is True
    assert _results(body["choices"][0]["content_filter_results"])


def test_block_offline_azure_client(
    cf_server: Callable[..., Server], upstream: Upstream
) -> None:
    upstream.control(replies={"story": "I will shoot you and your family tonight."})
    server = cf_server(action="block", thresholds={"hate": "low"})
    azure = AzureOpenAI(
        azure_endpoint=server.url, api_key=API_KEY, api_version="2024-07-01-preview", max_retries=0
    )
    try:
        rows = [
            _chat("safe", CAPITAL),
            _chat("threat", THREAT),
            _chat("story", "Please tell me a story about the sea."),
        ]
        batch, out, err = _run(azure, rows, "/chat/completions")
    finally:
        azure.close()
    assert batch.request_counts.completed == 2 and batch.request_counts.failed == 1
    # a flagged prompt is not sent upstream; its line is Azure's 400
    assert THREAT not in upstream.stats()["attempts"]
    refused = err["threat"]
    assert refused["error"] is None and refused["response"]["status_code"] == 400
    error = refused["response"]["body"]["error"]
    assert error["code"] == "content_filter" and error["param"] == "prompt"
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    result = _results(error["innererror"]["content_filter_result"])
    assert result["violence"] == {"filtered": True, "severity": "high"}
    assert result["sexual"] == SAFE["sexual"]
    # a flagged answer is withheld as Azure does
    story = out["story"]["response"]["body"]["choices"][0]
    assert story["finish_reason"] == "content_filter"
    assert story["message"]["content"] is None
    assert _results(story["content_filter_results"])["violence"]["filtered"] is True
    safe = out["safe"]["response"]["body"]
    assert safe["choices"][0]["finish_reason"] == "stop"
    assert safe["choices"][0]["content_filter_results"] == SAFE
    assert safe["prompt_filter_results"][0]["content_filter_results"] == SAFE


def test_moderation_server_as_classifier(
    cf_server: Callable[..., Server], sdk: Callable[..., OpenAI], upstream: Upstream
) -> None:
    moderation = {"model": "text-moderation-stable", "base_url": upstream.v1}
    c = sdk(cf_server(classifier="text-moderation-stable", deployments=[moderation]))
    rows = [_chat("safe", "hello there"), _chat("threat", "we will attack at dawn"),
            _chat("insult", "you absolute idiot")]
    _, out, err = _run(c, rows, "/v1/chat/completions")
    assert err == {}

    def prompt(cid: str) -> dict[str, Any]:
        body = out[cid]["response"]["body"]
        return _results(body["prompt_filter_results"][0]["content_filter_results"])

    assert prompt("safe") == SAFE
    # the fake flags "attack" as violence (0.95): high; harassment counts as hate
    assert prompt("threat") == {**SAFE, "violence": {"filtered": True, "severity": "high"}}
    assert prompt("insult") == {**SAFE, "hate": {"filtered": True, "severity": "high"}}
    stats = upstream.stats()
    assert stats["requests"] == 3 + 6  # three chats, a prompt and an answer judged for each
    assert stats["attempts"]['["we will attack at dawn"]'] == 1


def test_guard_model_as_classifier(
    cf_server: Callable[..., Server], sdk: Callable[..., OpenAI], upstream: Upstream
) -> None:
    guard = {"model": "llama-guard-3-8b", "base_url": upstream.v1}
    server = cf_server(
        classifier="llama-guard-3-8b", classifier_api="guard", action="block",
        deployments=[guard],
    )
    c = sdk(server)
    rows = [_chat("safe", "hello there"), _chat("bomb", "how do I build a bomb"),
            _chat("hate", "they are vermin")]
    _, out, err = _run(c, rows, "/v1/chat/completions")
    assert set(out) == {"safe"} and set(err) == {"bomb", "hate"}
    body = out["safe"]["response"]["body"]
    assert body["choices"][0]["content_filter_results"] == SAFE
    bomb = err["bomb"]["response"]["body"]["error"]["innererror"]["content_filter_result"]
    assert bomb == {**SAFE, "violence": {"filtered": True, "severity": "high"}}  # S1
    hate = err["hate"]["response"]["body"]["error"]["innererror"]["content_filter_result"]
    assert hate == {**SAFE, "hate": {"filtered": True, "severity": "high"}}  # S10
    # the guard saw each prompt (and the one answer) once; gpt-4o only the safe prompt
    assert upstream.stats()["attempts"] == {
        "hello there": 2,
        "echo: hello there": 1,
        "how do I build a bomb": 1,
        "they are vermin": 1,
    }


@pytest.fixture
def default_server(make_server: Callable[..., Server]) -> Iterator[Server]:
    yield make_server({"auth": {"keys": {API_KEY: "team-a"}}})  # no deployments: the defaults


def test_moderations_batch_offline(default_server: Server, sdk: Callable[..., OpenAI]) -> None:
    c = sdk(default_server)

    def line(cid: str, value: Any) -> dict[str, Any]:
        body = {"model": "omni-moderation-latest", "input": value}
        return {"custom_id": cid, "method": "POST", "url": "/v1/moderations", "body": body}

    rows = [
        line("one", THREAT),
        line("two", [CAPITAL, "Tell me the most painless way to kill myself."]),
        line("image", [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]),
    ]
    _, out, err = _run(c, rows, "/v1/moderations")
    one = ModerationCreateResponse.model_validate(out["one"]["response"]["body"])
    assert one.model == "omni-moderation-latest" and one.id.startswith("modr-")
    [threat] = one.results
    assert threat.flagged and threat.categories.violence
    assert threat.category_scores.violence > 0.5
    assert not threat.categories.sexual and threat.category_scores.sexual < 0.5
    assert not threat.categories.harassment and threat.category_scores.harassment == 0.0
    assert threat.category_applied_input_types.violence == ["text"]
    assert threat.category_applied_input_types.harassment == []  # not judged
    two = ModerationCreateResponse.model_validate(out["two"]["response"]["body"])
    capital, self_harm = two.results
    assert not capital.flagged and capital.category_scores.violence < 0.1
    assert self_harm.flagged and self_harm.categories.self_harm
    image = err["image"]["response"]
    assert image["status_code"] == 400
    assert image["body"]["error"]["param"] == "input[0]"
