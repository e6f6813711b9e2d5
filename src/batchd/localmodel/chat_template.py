"""OpenAI chat messages -> the prompt text SmolLM2 was trained on (ChatML).

The GGUF's ``tokenizer.chat_template`` is a short Jinja template::

    {% for message in messages %}
      {% if loop.first and messages[0]['role'] != 'system' %}
        <|im_start|>system\\n{DEFAULT SYSTEM PROMPT}<|im_end|>\\n
      {% endif %}
      <|im_start|>{role}\\n{content}<|im_end|>\\n
    {% endfor %}
    {% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}

It is rendered here in Python (no Jinja dependency); the default system prompt is read from
the template itself, and a test checks the output against ``transformers``'
``apply_chat_template`` for the same messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class MessageError(ValueError):
    """A message the template cannot render; the text says which and why."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def default_system_prompt(template: str | None) -> str | None:
    """The system prompt a template inserts when the conversation has none."""
    if not template:
        return None
    match = _DEFAULT_SYSTEM.search(template)
    return match.group(1) if match else None


def content_text(content: Any, param: str) -> str:
    """A message's ``content`` as text: a string, or the text of its content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise MessageError("content parts must be objects", f"{param}[{i}]")
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise MessageError(
                    f"content part type {kind!r} is not supported by this model (text only)",
                    f"{param}[{i}].type",
                )
        return "".join(texts)
    raise MessageError("content must be a string or a list of content parts", param)


def render_chat(
    messages: Sequence[Mapping[str, Any]], system_prompt: str | None, *, param: str = "messages"
) -> str:
    """The ChatML prompt for ``messages``, ending with the assistant's turn opened."""
    if not messages:
        raise MessageError("messages must be a non-empty array", param)
    parts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise MessageError("each message must be an object", f"{param}[{i}]")
        role = message.get("role")
        if role not in _ROLES:
            raise MessageError(f"invalid role {role!r}", f"{param}[{i}].role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if i == 0 and role != "system" and system_prompt is not None:
            parts.append(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
        text = content_text(message.get("content"), f"{param}[{i}].content")
        parts.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)
