"""SmolLM2's tokenizer rebuilt from the GGUF, against transformers' tokenizer for the same
file (tests/data/smollm2_reference.json), and its chat template."""

from __future__ import annotations

from typing import Any

import pytest

from batchd.localmodel.chat_template import (
    MessageError,
    default_system_prompt,
    render_chat,
)
from tests.unit.localmodel_support import reference, smollm2

REF = reference("smollm2_reference.json")


@pytest.mark.parametrize("text", sorted(REF["tokens"]))
def test_token_ids_match_reference(text: str) -> None:
    tokenizer = smollm2().tokenizer
    assert tokenizer.encode(text) == REF["tokens"][text]
    assert tokenizer.decode(REF["tokens"][text]) == text


def test_exact_ids_for_known_strings() -> None:
    tokenizer = smollm2().tokenizer
    assert tokenizer.encode("Hello, world!") == [19556, 28, 905, 17]
    # digits are split one by one ("2024" -> 2 0 2 4)
    assert tokenizer.encode("2024") == [34, 32, 34, 36]
    assert tokenizer.encode("<|im_start|>user\n") == [1, 4093, 198]


def test_chat_prompt_matches_apply_chat_template() -> None:
    llm = smollm2()
    system = default_system_prompt(llm.chat_template)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = render_chat(messages, system)
    assert prompt == REF["chat_prompt"]
    assert llm.tokenizer.encode(prompt) == REF["chat_ids"]


def test_chat_template_keeps_a_given_system_message_and_text_parts() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}],
        },
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert render_chat(messages, "DEFAULT") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
    ],
)
def test_bad_messages_name_the_param(messages: list[Any], param: str) -> None:
    with pytest.raises(MessageError) as info:
        render_chat(messages, None)
    assert info.value.param == param


def test_token_bytes_join_to_the_text() -> None:
    tok = smollm2().tokenizer
    text = "Café déjà vu — 東京 🙂 x² <|im_end|>"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    # some tokens hold part of a character: their bytes are not valid UTF-8 alone
    partial = [i for i in ids if "\ufffd" in tok.token_bytes(i).decode("utf-8", "replace")]
    assert partial
