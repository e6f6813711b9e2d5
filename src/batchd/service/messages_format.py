"""Anthropic Messages <-> OpenAI chat completions, for Message Batches on chat upstreams.

The request direction (:func:`chat_body`) turns one request's Messages ``params`` into a chat
completions body: ``system`` (a string or text blocks) becomes a system message; each message's
content (a string or blocks: ``text``, ``image`` with a base64 or URL source, ``tool_use``,
``tool_result``) becomes chat content, ``tool_calls`` and ``tool`` messages; ``max_tokens``,
``stop_sequences`` (-> ``stop``), ``temperature``, ``top_p``, ``metadata.user_id`` (-> ``user``),
``tools`` (-> functions, ``input_schema`` -> ``parameters``) and ``tool_choice`` (``auto``,
``any`` -> ``required``, ``tool`` -> a named function, ``none``; ``disable_parallel_tool_use``
-> ``parallel_tool_calls: false``) are mapped; ``top_k`` is passed through as ``top_k``, which
vLLM, SGLang and llama.cpp read. Anything else (``thinking``, ``stream``, server tools, ...)
is refused, naming the field: nothing is silently dropped.

The answer direction (:func:`message_of`) turns a chat completion into an Anthropic Message:
``content`` (a text block, then a ``tool_use`` block per tool call), ``stop_reason``
(``stop`` -> ``end_turn``, or ``stop_sequence`` when the upstream names the matched string in
``choices[0].stop_reason`` as vLLM does; ``length`` -> ``max_tokens``; ``tool_calls`` ->
``tool_use``; ``content_filter`` -> ``refusal``) and ``usage`` (``prompt_tokens`` ->
``input_tokens``, ``completion_tokens`` -> ``output_tokens``, cached prompt tokens ->
``cache_read_input_tokens``). Field lists: the ``anthropic`` SDK's ``types/`` (Message,
MessageCreateParams) and the ``openai`` SDK's ChatCompletion.
"""

from __future__ import annotations

from typing import Any

import orjson

from batchd.errors import InvalidRequest

_PARAMS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "metadata",
        "tools",
        "tool_choice",
    }
)


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_value", param=param)


def _text_of(blocks: Any, where: str) -> str:
    """The text of a string or of a list of ``text`` blocks (``system``, ``tool_result``)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _bad(f"{where}: expected a string or a list of text blocks.", where)
    parts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"{where}.{i}: only text blocks are supported here.", f"{where}.{i}")
        text = block.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.{i}.text: expected a string.", f"{where}.{i}.text")
        parts.append(text)
    return "\n".join(parts)


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if isinstance(media, str) and isinstance(data, str):
            return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(
        source.get("url"), str
    ):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise _bad(f"{where}.source: expected a base64 or url image source.", f"{where}.source")


class _Turn:
    """One message's content blocks, gathered as chat content, tool calls and tool results."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.parts: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def add(self, block: Any, at: str) -> None:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            self.parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and self.role == "user":
            self.parts.append(_image(block, at))
        elif kind == "tool_use" and self.role == "assistant":
            name, call_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise _bad(f"{at}: tool_use needs a string id and name.", at)
            args = orjson.dumps(block.get("input") or {}).decode()
            self.calls.append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            )
        elif kind == "tool_result" and self.role == "user":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise _bad(f"{at}.tool_use_id: expected a string.", f"{at}.tool_use_id")
            text = _text_of(block.get("content", ""), f"{at}.content")
            self.results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        else:
            raise _bad(f"{at}: unsupported content block {str(kind)[:40]!r} for {self.role}.", at)

    def chat(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = list(self.results)
        if self.parts or self.calls:
            only_text = all(p["type"] == "text" for p in self.parts)
            body: Any = "".join(p["text"] for p in self.parts) if only_text else self.parts
            msg: dict[str, Any] = {"role": self.role, "content": body if self.parts else None}
            if self.calls:
                msg["tool_calls"] = self.calls
            out.append(msg)
        return out


def _message(msg: Any, where: str) -> list[dict[str, Any]]:
    """One Messages message as chat messages (a user turn with tool results becomes one
    ``tool`` message per result, then the rest of the turn)."""
    if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
        raise _bad(f"{where}: expected {{role: user|assistant, content}}.", f"{where}.role")
    role, content = msg["role"], msg.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content: expected a string or a list of blocks.", f"{where}.content")
    turn = _Turn(role)
    for i, block in enumerate(content):
        turn.add(block, f"{where}.content.{i}")
    return turn.chat()


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools: expected a list.", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _bad(f"tools.{i}: expected {{name, input_schema}}.", f"tools.{i}")
        if tool.get("type") not in (None, "custom"):
            raise _bad(f"tools.{i}: server tools are not supported.", f"tools.{i}.type")
        fn: dict[str, Any] = {
            "name": tool["name"],
            "parameters": tool.get("input_schema") or {"type": "object"},
        }
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, body: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        body["tool_choice"] = "auto"
    elif kind == "any":
        body["tool_choice"] = "required"
    elif kind == "none":
        body["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _bad("tool_choice: expected {type: auto|any|tool|none}.", "tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        body["parallel_tool_calls"] = False


def _number(params: dict[str, Any], key: str, low: float, high: float | None) -> Any:
    value = params[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        upper = "" if high is None else f" and {high}"
        raise _bad(f"{key}: expected a number between {low}{upper}.", key)
    return value


def _required(params: dict[str, Any]) -> tuple[str, int, list[Any]]:
    """``model``, ``max_tokens`` and ``messages``, checked (every Messages request has them)."""
    model, max_tokens, messages = (params.get(k) for k in ("model", "max_tokens", "messages"))
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required.", code="missing_required_parameter",
                             param="model")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad("max_tokens: expected an integer of at least 1.", "max_tokens")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: expected a non-empty list.", "messages")
    return model, max_tokens, messages


def messages_body(params: Any) -> dict[str, Any]:
    """One request's Messages ``params`` as the body for an upstream that speaks
    ``/v1/messages`` (``api_style = "anthropic"``): unchanged, once ``model``, ``max_tokens``
    and ``messages`` are there and ``stream`` is not asked for (a batch does not stream).
    Every other param is the upstream's to accept or refuse (a refusal is an ``errored``
    result). Raises :class:`InvalidRequest` naming the field relative to ``params``."""
    if not isinstance(params, dict):
        raise _bad("params: expected an object.", "params")
    _required(params)
    if params.get("stream") not in (None, False):
        raise _bad("stream: a message batch does not stream; leave it out.", "stream")
    return params


def chat_body(params: Any) -> dict[str, Any]:
    """The chat completions body for one request's Messages ``params``.

    Raises :class:`InvalidRequest` naming the field (relative to ``params``) that is missing,
    of the wrong type, or not supported."""
    if not isinstance(params, dict):
        raise _bad("params: expected an object.", "params")
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        raise _bad(f"{unknown[0][:64]}: not supported by batchd's Message Batches.", unknown[0])
    model, max_tokens, messages = _required(params)
    chat: list[dict[str, Any]] = []
    if params.get("system") is not None:
        chat.append({"role": "system", "content": _text_of(params["system"], "system")})
    for i, msg in enumerate(messages):
        chat.extend(_message(msg, f"messages.{i}"))
    body: dict[str, Any] = {"model": model, "messages": chat, "max_tokens": max_tokens}
    _sampling(params, body)
    if params.get("tools") is not None:
        body["tools"] = _tools(params["tools"])
    if params.get("tool_choice") is not None:
        _tool_choice(params["tool_choice"], body)
    return body


def _sampling(params: dict[str, Any], body: dict[str, Any]) -> None:
    """``stop_sequences``, ``temperature``, ``top_p``, ``top_k`` and ``metadata.user_id``."""
    stops = params.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences: expected a list of strings.", "stop_sequences")
        if stops:
            body["stop"] = stops
    if params.get("temperature") is not None:
        body["temperature"] = _number(params, "temperature", 0.0, 1.0)
    if params.get("top_p") is not None:
        body["top_p"] = _number(params, "top_p", 0.0, 1.0)
    if params.get("top_k") is not None:
        body["top_k"] = int(_number(params, "top_k", 0, None))
    metadata = params.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        body["user"] = metadata["user_id"]


_STOP_REASONS = {
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def message_of(body: Any, message_id: str) -> dict[str, Any]:
    """The Anthropic Message for a chat completion ``body`` (read leniently: a field that is
    missing or of another type gives an empty value, never an error)."""
    doc = body if isinstance(body, dict) else {}
    choices = doc.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    choice = choice if isinstance(choice, dict) else {}
    msg: dict[str, Any] = choice["message"] if isinstance(choice.get("message"), dict) else {}
    content: list[dict[str, Any]] = []
    text = msg.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = {}
        content.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or ""),
                "name": str(fn.get("name") or ""),
                "input": args if isinstance(args, dict) else {},
            }
        )
    finish = choice.get("finish_reason")
    matched = choice.get("stop_reason")
    stop_sequence = matched if finish == "stop" and isinstance(matched, str) else None
    reason = "stop_sequence" if stop_sequence else _STOP_REASONS.get(str(finish), "end_turn")
    usage: dict[str, Any] = doc["usage"] if isinstance(doc.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": str(doc.get("model") or ""),
        "content": content,
        "stop_reason": reason,
        "stop_sequence": stop_sequence,
        "usage": {
            "input_tokens": _int(usage.get("prompt_tokens")),
            "output_tokens": _int(usage.get("completion_tokens")),
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        },
    }
