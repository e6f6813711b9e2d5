"""`batchd serve` with no deployments answers with its embedded models, through the SDK."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import pytest
from openai import OpenAI

from batchd.localmodel.packages import MINILM, SMOLLM2
from tests.support import Server, read_jsonl, start_server, wait_batch, wait_ended, write_config
from tests.unit.localmodel_support import weights_dir


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    weights_dir(SMOLLM2)
    weights_dir(MINILM)
    tmp = tmp_path_factory.mktemp("local")
    server = start_server(write_config(tmp, {}), tmp)  # no deployments: the embedded defaults
    yield server
    server.proc.stop()


def _run(c: OpenAI, rows: list[dict[str, Any]], endpoint: str) -> list[dict[str, Any]]:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    file = c.files.create(file=("in.jsonl", data), purpose="batch")
    batch = c.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")
    batch = wait_batch(c, batch.id, timeout=240)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and batch.request_counts.failed == 0
    out = {r["custom_id"]: r for r in read_jsonl(c.files.content(batch.output_file_id).text)}
    return [out[r["custom_id"]]["response"]["body"] for r in rows]


def test_chat_answers_from_the_model(local_server: Server, sdk: Callable[..., OpenAI]) -> None:
    c = sdk(local_server)

    def ask(cid: str, text: str) -> dict[str, Any]:
        return {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2-135m-instruct",
                "temperature": 0,
                "max_tokens": 12,
                "messages": [{"role": "user", "content": text}],
            },
        }

    capital = "What is the capital of France?"
    bodies = _run(
        c,
        [
            ask("a", capital),
            ask("b", capital),
            ask("c", "Name a primary colour."),
            ask("d", capital),
        ],
        "/v1/chat/completions",
    )
    answers = [b["choices"][0]["message"]["content"] for b in bodies]
    assert "Paris" in answers[0]
    assert answers[0] == answers[1] == answers[3]  # same prompt, same answer across the batch
    assert answers[2] != answers[0]
    for b in bodies:
        assert b["object"] == "chat.completion"
        usage = b["usage"]
        assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 12
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_quick_start_question_at_the_default_sampling(
    local_server: Server, sdk: Callable[..., OpenAI]
) -> None:
    """A request that sets no temperature gets SmolLM2's recommended sampling (0.2, top_p
    0.9) and answers "What is 2 + 2?" with 4; at OpenAI's defaults (1, 1), which a request
    may still ask for, this small model rarely does. Seeded: the same answers every run."""
    c = sdk(local_server)

    def ask(cid: str, seed: int, **sampling: float) -> dict[str, Any]:
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "What is 2 + 2?"}],
            "max_tokens": 24,
            "seed": seed,
            **sampling,
        }
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}

    rows = [ask(f"default-{i}", i) for i in range(8)]
    rows += [ask(f"openai-{i}", i, temperature=1.0, top_p=1.0) for i in range(8)]
    bodies = _run(c, rows, "/v1/chat/completions")
    says_4 = ["4" in b["choices"][0]["message"]["content"] for b in bodies]
    assert sum(says_4[:8]) >= 7, bodies[:8]
    assert sum(says_4[8:]) <= 4, bodies[8:]


def test_embeddings_from_the_model(local_server: Server, sdk: Callable[..., OpenAI]) -> None:
    c = sdk(local_server)
    texts = {
        "cat": "A cat is sleeping on the sofa.",
        "para": "On the couch, a cat is asleep.",
        "other": "The stock market fell sharply today.",
    }
    rows = [
        {
            "custom_id": k,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm-l6-v2", "input": v},
        }
        for k, v in texts.items()
    ]
    bodies = _run(c, rows, "/v1/embeddings")
    vec = {r["custom_id"]: b["data"][0]["embedding"] for r, b in zip(rows, bodies, strict=True)}
    assert all(len(v) == 384 for v in vec.values())

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    assert cos(vec["cat"], vec["para"]) > cos(vec["cat"], vec["other"]) + 0.2


def test_message_batches_answered_by_the_embedded_chat_model(local_server: Server) -> None:
    """Anthropic's Message Batches with the real `anthropic` SDK, on the embedded chat model:
    the params are translated to a chat completion and its answer back to a Message."""
    claude = anthropic.Anthropic(base_url=local_server.url, api_key="local", max_retries=0)
    params = {
        "model": "smollm2-135m-instruct",
        "max_tokens": 12,
        "temperature": 0,
        "system": "Answer in one short sentence.",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    stopped = {**params, "stop_sequences": ["Paris"]}
    created = claude.messages.batches.create(
        requests=[  # type: ignore[misc]
            *({"custom_id": cid, "params": params} for cid in ("a", "b")),
            {"custom_id": "s", "params": stopped},
        ]
    )
    batch = wait_ended(claude, created.id, timeout=240)
    assert batch.request_counts.succeeded == 3
    results = {r.custom_id: r.result for r in claude.messages.batches.results(created.id)}
    cut = results.pop("s")
    assert cut.type == "succeeded"
    assert (cut.message.stop_reason, cut.message.stop_sequence) == ("stop_sequence", "Paris")
    assert "Paris" not in cut.message.content[0].text  # type: ignore[union-attr]
    texts = []
    for result in results.values():
        assert result.type == "succeeded"
        message = result.message
        assert message.role == "assistant" and message.model == "smollm2-135m-instruct"
        assert message.stop_reason in ("end_turn", "max_tokens")
        assert message.usage.input_tokens > 10 and 0 < message.usage.output_tokens <= 12
        assert message.content[0].type == "text"
        texts.append(message.content[0].text)
    assert "Paris" in texts[0] and texts[0] == texts[1]  # temperature 0: the same answer
    claude.close()
