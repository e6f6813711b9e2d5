"""OpenAI request bodies -> what the embedded models run, validated.

Every refusal is a :class:`BadRequest` carrying the ``param`` it is about; the backend turns it
into a 400 with OpenAI's error envelope. Parameters that change nothing for this model
(``user``, ``metadata`` of chat ...) are accepted and ignored, as OpenAI-compatible servers
commonly do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchd.localmodel.chat_template import content_text, render_chat
from batchd.localmodel.sampling import OPENAI_DEFAULTS, SamplingDefaults, SamplingParams

MAX_N = 16
MAX_STOP = 4
MAX_EMBEDDING_INPUTS = 2048
MAX_LOGIT_BIAS = 1024  # tokens a request may bias
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs; completions' logprobs allows 5
EMBEDDING_DIMENSIONS = 384

Prompt = str | list[int] | list[dict[str, Any]]


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    kind: str  # "chat" | "completion" | "response"
    prompts: list[Prompt]  # one per prompt; chat and responses have one list of messages
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: not asked for; else how many alternatives a token
    n: int = 1
    stop: tuple[str, ...] = ()
    echo: bool = False
    instructions: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def sampling_for(self, index: int) -> SamplingParams:
        """The sampling of choice ``index`` (seeded choices get distinct seeds)."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed,
            logit_bias=self.logit_bias,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    inputs: list[str | list[int]]
    encoding_format: str


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number between {low} and {high}", param=name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    too_high = high is not None and isinstance(value, int) and value > high
    if isinstance(value, bool) or not isinstance(value, int) or value < low or too_high:
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{name} must be an integer {bound}", param=name)
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise BadRequest(
            f"stop must be a string or a list of up to {MAX_STOP} non-empty strings", param="stop"
        )
    return tuple(stop)


def _no_stream(body: Mapping[str, Any]) -> None:
    if body.get("stream"):
        raise BadRequest("stream is not supported in a batch", param="stream")


def _sampling(body: Mapping[str, Any], defaults: SamplingDefaults) -> dict[str, Any]:
    """The sampling fields of a body; ``temperature`` and ``top_p`` that it leaves unset (or
    null) come from the model's ``defaults``."""
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer", param="seed")
    return {
        "temperature": _number(body, "temperature", defaults.temperature, 0.0, 2.0),
        "top_p": _number(body, "top_p", defaults.top_p, 0.0, 1.0),
        "seed": seed,
        "logit_bias": _logit_bias(body),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    }


def _logit_bias(body: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` with biases in [-100, 100]; the ids are checked against the
    vocabulary once the model is loaded."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(
            f"logit_bias must be an object of up to {MAX_LOGIT_BIAS} token ids", param="logit_bias"
        )
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else None
        if token is None:
            raise BadRequest(f"logit_bias: {key!r} is not a token id", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or abs(value) > 100:
            raise BadRequest(
                f"logit_bias: the bias of token {key} must be a number between -100 and 100",
                param="logit_bias",
            )
        out[token] = float(value)
    return tuple(sorted(out.items()))


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise BadRequest("logprobs must be a boolean", param="logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def parse_chat(
    body: Mapping[str, Any], defaults: SamplingDefaults = OPENAI_DEFAULTS
) -> GenerationRequest:
    _no_stream(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages is required: a non-empty array of messages", param="messages")
    render_chat(messages, None)  # MessageError (400) now rather than on the model thread
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    return GenerationRequest(
        kind="chat",
        prompts=[messages],
        max_tokens=max_tokens,
        logprobs=_chat_logprobs(body),
        n=_integer(body, "n", 1, MAX_N) or 1,
        stop=_stop(body),
        **_sampling(body, defaults),
    )


def _completion_prompts(prompt: Any) -> list[Prompt]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise BadRequest(
        "prompt is required: a string, a list of strings, or token ids", param="prompt"
    )


def parse_completions(
    body: Mapping[str, Any], defaults: SamplingDefaults = OPENAI_DEFAULTS
) -> GenerationRequest:
    _no_stream(body)
    if body.get("suffix"):
        raise BadRequest("suffix is not supported by this model", param="suffix")
    prompts = _completion_prompts(body.get("prompt"))
    max_tokens = _integer(body, "max_tokens", 0)
    return GenerationRequest(
        kind="completion",
        prompts=prompts,
        max_tokens=16 if max_tokens is None else max(max_tokens, 1),  # OpenAI's default: 16
        logprobs=_integer(body, "logprobs", 0, 5),
        n=_integer(body, "n", 1, MAX_N) or 1,
        stop=_stop(body),
        echo=bool(body.get("echo")),
        **_sampling(body, defaults),
    )


def _response_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("input is required: a string or a list of messages", param="input")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("instructions must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise BadRequest("only message items are supported by this model", param=f"input[{i}]")
        text = content_text(item.get("content"), f"input[{i}].content")
        messages.append({"role": item.get("role"), "content": text})
    render_chat(messages, None, param="input")
    return messages


def parse_responses(
    body: Mapping[str, Any], defaults: SamplingDefaults = OPENAI_DEFAULTS
) -> GenerationRequest:
    _no_stream(body)
    if body.get("tools"):
        raise BadRequest("tools are not supported by this model", param="tools")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BadRequest("metadata must be an object", param="metadata")
    instructions = body.get("instructions")
    return GenerationRequest(
        kind="response",
        prompts=[_response_messages(body)],
        max_tokens=_integer(body, "max_output_tokens", 1),
        instructions=instructions if isinstance(instructions, str) else None,
        metadata=metadata,
        **_sampling(body, defaults),
    )


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRequest("input is required: a string or a non-empty array", param="input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"input may hold at most {MAX_EMBEDDING_INPUTS} items", param="input")
    inputs: list[str | list[int]] = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            inputs.append(item)
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)
        ):
            inputs.append([int(t) for t in item])
        else:
            raise BadRequest(
                "each input must be a non-empty string or a non-empty array of token ids",
                param=f"input[{i}]",
            )
    return inputs


def parse_embeddings(body: Mapping[str, Any], vocab_size: int = 30522) -> EmbeddingRequest:
    inputs = _embedding_inputs(body.get("input"))
    for i, item in enumerate(inputs):
        if isinstance(item, list) and max(item) >= vocab_size:
            raise BadRequest(f"token ids must be below {vocab_size}", param=f"input[{i}]")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != EMBEDDING_DIMENSIONS:
        raise BadRequest(
            f"this model's embeddings have {EMBEDDING_DIMENSIONS} dimensions", param="dimensions"
        )
    return EmbeddingRequest(inputs=inputs, encoding_format=encoding)
