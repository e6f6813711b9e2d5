"""The texts a content filter judges: a request's prompts and its answer's choices.

Azure filters chat completions and completions: one ``prompt_filter_results`` entry a prompt
(a chat request is one prompt: all its messages), one ``content_filter_results`` a choice.
Responses are judged the same way (their input is one prompt, their output text one
answer), and so are Anthropic Messages passed through to a ``/v1/messages`` upstream (the
system prompt and messages one prompt, the text blocks of the answer one answer). Only text
is judged: image, audio and file parts, tool calls and token-id prompts are not (a token-id
prompt has no text: it is reported as not filtered).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchd.models import CHAT_COMPLETIONS, COMPLETIONS, MESSAGES_ENDPOINT, RESPONSES

FILTERED_ENDPOINTS = frozenset({CHAT_COMPLETIONS, COMPLETIONS, RESPONSES, MESSAGES_ENDPOINT})
_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal"})


def _content_text(content: Any) -> str:
    """A message's ``content``: a string, or the text of its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS:
                text = part.get("text", part.get("refusal"))
                if isinstance(text, str):
                    parts.append(text)
        return "\n".join(parts)
    return ""


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    return "\n".join(
        text
        for m in messages
        if isinstance(m, dict) and (text := _content_text(m.get("content")))
    )


def prompt_texts(endpoint: str, body: Mapping[str, Any]) -> list[str | None]:
    """The prompts of a request body, in order; ``None`` for a prompt without text (token
    ids). Chat: one prompt, every message. Completions: one a prompt. Responses: one,
    ``instructions`` and every input message. Messages: one, ``system`` and every message.
    Other endpoints: none."""
    if endpoint == CHAT_COMPLETIONS:
        return [_messages_text(body.get("messages"))]
    if endpoint == MESSAGES_ENDPOINT:
        system = _content_text(body.get("system"))
        text = _messages_text(body.get("messages"))
        return [f"{system}\n{text}" if system else text]
    if endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt)
        return [None]
    if endpoint == RESPONSES:
        items = body.get("input")
        text = items if isinstance(items, str) else _messages_text(items)
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            text = f"{instructions}\n{text}"
        return [text]
    return []


def choice_texts(endpoint: str, body: Mapping[str, Any]) -> list[str]:
    """The answer's texts: one a choice (chat: the message's content; completions: the
    text); a response's output text as one; a Message's text blocks as one. Other
    endpoints: none."""
    if endpoint == MESSAGES_ENDPOINT:
        return [_content_text(body.get("content"))]
    if endpoint == RESPONSES:
        output = body.get("output")
        items = output if isinstance(output, list) else []
        return [
            "\n".join(
                _content_text(item.get("content"))
                for item in items
                if isinstance(item, dict) and item.get("type") == "message"
            )
        ]
    choices = body.get("choices")
    if endpoint not in (CHAT_COMPLETIONS, COMPLETIONS) or not isinstance(choices, list):
        return []
    out = []
    for choice in choices:
        if not isinstance(choice, dict):
            out.append("")
        elif endpoint == CHAT_COMPLETIONS:
            message = choice.get("message")
            out.append(_content_text(message.get("content")) if isinstance(message, dict) else "")
        else:
            text = choice.get("text")
            out.append(text if isinstance(text, str) else "")
    return out
