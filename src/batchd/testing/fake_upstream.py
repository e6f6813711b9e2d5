"""A small OpenAI-compatible model server for tests and benchmarks.

It answers ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/responses`` and ``/v1/moderations`` like a real server would (the chat answer echoes
the last user message; a model whose name contains "guard" answers as Llama Guard does, and
``/v1/moderations`` as OpenAI's moderation model does, both by word lists: see
:mod:`batchd.testing.fake_moderation`), and ``/v1/messages`` as Anthropic does (a Message
``msg_…`` with one text block echoing the last user message, ``stop_reason`` ``end_turn``,
``max_tokens`` or ``stop_sequence``, ``usage`` in input/output tokens, a ``request-id``
header; it requires ``x-api-key`` (401) and ``anthropic-version`` (400), refuses params
Anthropic does not know (400), and its errors have Anthropic's shape
``{"type": "error", "error": {"type", "message"}}``). Switches, set by ``POST /_control``:

- ``latency``: seconds before each answer;
- ``capacity``: a model server's capacity (0: unlimited): it serves that many requests at
  once, each for ``latency``, and queues the rest first come first served, so that their
  latency grows with the queue; past ``queue_limit`` waiting it answers 429
  (``retry-after: 1``), as vLLM behind a gateway does;
- ``fail_rate``: share of requests answered 500;
- ``rate_limit_rate``: share answered 429 with ``retry-after: <retry_after>``;
- ``reject_content``: a substring that makes a chat request a final 400;
- ``replies``: ``{key: text}``: a chat, completions or responses request whose prompt
  contains ``key`` is answered with ``text`` instead of the echo;
- ``misbehave``: ``{key: behaviour}`` for requests whose prompt contains ``key`` (or whose
  model is NAME, for a key ``model=NAME``), the upstream misbehaviours of real servers and
  gateways: ``html_500`` (an HTML error page), ``non_json_2xx`` (a 200 that is not JSON),
  ``truncated`` (the connection closes mid-body), ``nested`` (a 200 nested 1,500 levels
  deep), ``invalid_utf8`` (a 200 with invalid UTF-8 inside a string), ``null_usage``
  (``cached_tokens: null`` and float counts, as LiteLLM-style gateways send), ``always_500``,
  ``retry_after_long`` (429 with ``retry-after: 3600``), ``never_answer`` (no answer at all),
  ``overloaded`` (529 ``overloaded_error``, as Anthropic answers when busy).

``GET /_stats`` reports the requests seen, the most in flight at once, how often each
prompt was answered with a 2xx (to find duplicates), when its last 2xx was sent
(``answered_at``, unix seconds), how often each was tried at all (``attempts``) and, for
``/v1/messages``, how many requests carried each ``x-api-key`` and ``anthropic-version``
value (``message_headers``, ``"name: value" -> count``). ``POST /_reset`` clears them.

Run: ``python -m batchd.testing.fake_upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from batchd.envelopes import anthropic_error, openai_error
from batchd.models import MESSAGES_ENDPOINT
from batchd.testing.fake_moderation import guard_verdict, moderation_answer


@dataclass
class Switches:
    latency: float = 0.0
    capacity: int = 0
    queue_limit: int = 1_000_000
    fail_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after: float = 0.05
    reject_content: str | None = None
    replies: dict[str, str] = field(default_factory=dict)
    misbehave: dict[str, str] = field(default_factory=dict)


@dataclass
class Stats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    status: Counter[int] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    answered_at: dict[str, float] = field(default_factory=dict)  # prompt: its last 2xx
    message_headers: Counter[str] = field(default_factory=Counter)
    first_at: float = 0.0  # unix seconds: the first request seen since the last reset
    last_at: float = 0.0  # ... and the last answer sent

    def begin(self) -> None:
        self.requests += 1
        if not self.first_at:
            self.first_at = time.time()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def end(self) -> None:
        self.in_flight -= 1
        self.last_at = time.time()


def _prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        msgs = body.get("messages") or [{}]
        content = msgs[-1].get("content", "") if isinstance(msgs[-1], dict) else ""
        return content if isinstance(content, str) else orjson.dumps(content).decode()
    for key in ("prompt", "input"):
        if key in body:
            value = body[key]
            return value if isinstance(value, str) else orjson.dumps(value).decode()
    return ""


def _usage(prompt: str, completion: int) -> dict[str, int]:
    p = max(1, len(prompt) // 4)
    return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}


def _message(model: Any, prompt: str, text: str, body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Message: ``text`` cut at the first of ``stop_sequences`` it contains
    (``stop_sequence``), or at ``max_tokens`` when that is under 3 (``max_tokens``)."""
    stop_reason, matched, output = "end_turn", None, 3
    stops = body.get("stop_sequences")
    for stop in stops if isinstance(stops, list) else []:
        if isinstance(stop, str) and stop and stop in text:
            text, stop_reason, matched = text.split(stop, 1)[0], "stop_sequence", stop
            break
    limit = body.get("max_tokens")
    if matched is None and isinstance(limit, int) and 0 < limit < output:
        text, stop_reason, output = text[: limit * 4], "max_tokens", limit
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": matched,
        "usage": {
            "input_tokens": max(1, len(prompt) // 4),
            "output_tokens": output,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def answer(path: str, body: dict[str, Any], reply: str | None = None) -> dict[str, Any]:
    """The answer to ``body`` on ``path``; ``reply``: the text to answer with (default: an
    echo of the prompt, or a guard model's verdict on it)."""
    model = body.get("model", "fake")
    prompt = _prompt(body)
    now = int(time.time())
    text = f"echo: {prompt}" if reply is None else reply
    if reply is None and "guard" in str(model).lower():
        text = guard_verdict(prompt)
    if path == MESSAGES:
        return _message(model, prompt, text, body)
    if path.endswith("/chat/completions"):
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": now,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(prompt, 3),
        }
    if path.endswith("/completions"):
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": now,
            "model": model,
            "choices": [
                {"index": 0, "text": f" {text}", "finish_reason": "stop", "logprobs": None}
            ],
            "usage": _usage(prompt, 3),
        }
    if path.endswith("/embeddings"):
        inputs = body.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        rng = random.Random(prompt)
        return {
            "object": "list",
            "model": model,
            "data": [
                {"object": "embedding", "index": i, "embedding": [rng.random() for _ in range(8)]}
                for i in range(len(items))
            ],
            "usage": {
                "prompt_tokens": max(1, len(prompt) // 4),
                "total_tokens": max(1, len(prompt) // 4),
            },
        }
    if path.endswith("/responses"):
        return {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": now,
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{uuid.uuid4().hex}",
                    "role": "assistant",
                    "status": "completed",
                    "content": [
                        {"type": "output_text", "text": text, "annotations": []}
                    ],
                }
            ],
            "usage": {
                "input_tokens": max(1, len(prompt) // 4),
                "output_tokens": 3,
                "total_tokens": max(1, len(prompt) // 4) + 3,
            },
        }
    return moderation_answer(str(model), body.get("input"))


MESSAGES = MESSAGES_ENDPOINT
# The params of Anthropic's POST /v1/messages (the ``anthropic`` SDK's MessageCreateParams).
_MESSAGES_PARAMS = frozenset(
    {
        "model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p",
        "top_k", "metadata", "tools", "tool_choice", "thinking", "stream", "service_tier",
        "container", "mcp_servers", "context_management", "output_format",
    }
)
_ANTHROPIC_TYPES = {"server_error": "api_error"}  # OpenAI's error type -> Anthropic's


def _error(status: int, message: str, type_: str, path: str = "") -> web.Response:
    """An error answer: Anthropic's shape on ``/v1/messages``, else OpenAI's."""
    if path == MESSAGES:
        body = anthropic_error(message, _ANTHROPIC_TYPES.get(type_, type_))
        resp = web.Response(
            body=orjson.dumps(body), status=status, content_type="application/json"
        )
        resp.headers["request-id"] = f"req_{uuid.uuid4().hex}"
        return resp
    body = openai_error(message, type_)
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _injected_failure(switches: Switches, prompt: str, path: str) -> web.Response | None:
    roll = random.random()
    if roll < switches.fail_rate:
        return _error(500, "The server had an error.", "server_error", path)
    if roll < switches.fail_rate + switches.rate_limit_rate:
        resp = _error(429, "Rate limit reached.", "rate_limit_error", path)
        resp.headers["retry-after"] = str(switches.retry_after)
        return resp
    if switches.reject_content and switches.reject_content in prompt:
        return _error(400, "This request was rejected.", "invalid_request_error", path)
    return None


def _messages_refusal(
    request: web.Request, body: dict[str, Any], stats: Stats
) -> web.Response | None:
    """What Anthropic refuses before answering: no key, no version, a param it does not know
    or a missing required one."""
    for name in ("x-api-key", "anthropic-version"):
        value = request.headers.get(name)
        if value is not None:
            stats.message_headers[f"{name}: {value}"] += 1
    if "x-api-key" not in request.headers:
        return _error(401, "x-api-key header is required", "authentication_error", MESSAGES)
    if "anthropic-version" not in request.headers:
        return _error(
            400, "anthropic-version: header is required", "invalid_request_error", MESSAGES
        )
    unknown = sorted(set(body) - _MESSAGES_PARAMS)
    if unknown:
        return _error(
            400, f"{unknown[0]}: Extra inputs are not permitted", "invalid_request_error", MESSAGES
        )
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return _error(400, f"{name}: Field required", "invalid_request_error", MESSAGES)
    return None


def _behaviour(switches: Switches, model: str, prompt: str) -> str | None:
    for key, behaviour in switches.misbehave.items():
        if key.startswith("model="):
            if model == key[6:]:
                return behaviour
        elif key in prompt:
            return behaviour
    return None


async def _misbehave(
    request: web.Request, behaviour: str, path: str, body: dict[str, Any]
) -> web.StreamResponse:
    if behaviour == "html_500":
        html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        return web.Response(body=html, status=500, content_type="text/html")
    if behaviour == "non_json_2xx":
        return web.Response(body=b"OK", status=200, content_type="text/plain")
    if behaviour == "truncated":
        resp = web.StreamResponse(status=200, headers={"content-type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"id": "cut", "choices": [')
        assert request.transport is not None
        request.transport.close()
        return resp
    if behaviour == "nested":
        deep = b'{"id": "deep", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}"
        return web.Response(body=deep, content_type="application/json")
    if behaviour == "invalid_utf8":
        good = orjson.dumps(answer(path, body))
        broken = good.replace(b"echo: ", b"echo: \xff\xfe ", 1)
        return web.Response(body=broken, content_type="application/json")
    if behaviour == "null_usage":
        doc = answer(path, body)
        doc["usage"] = {
            "prompt_tokens": 7.0,
            "completion_tokens": 3,
            "total_tokens": 10.0,
            "prompt_tokens_details": {"cached_tokens": None, "audio_tokens": None},
            "completion_tokens_details": None,
            "extra": {"anything": [1, 2]},
        }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")
    if behaviour == "always_500":
        return _error(500, "The server had an error.", "server_error", path)
    if behaviour == "overloaded":
        return _error(529, "Overloaded", "overloaded_error", path)
    if behaviour == "retry_after_long":
        resp = _error(429, "Rate limit reached.", "rate_limit_error", path)
        resp.headers["retry-after"] = "3600"
        return resp
    if behaviour == "never_answer":
        await asyncio.sleep(3600)
    return _error(400, f"unknown behaviour {behaviour}", "invalid_request_error", path)


async def _odd_answer(
    request: web.Request, behaviour: str, body: dict[str, Any], prompt: str, stats: Stats
) -> web.StreamResponse:
    resp = await _misbehave(request, behaviour, request.path, body)
    stats.status[resp.status] += 1
    if resp.status < 300 and behaviour != "truncated":
        stats.answered[prompt] += 1
    return resp


class _Server:
    """The capacity model: ``capacity`` places, a FIFO queue for the rest."""

    def __init__(self) -> None:
        self.serving = 0
        self.queue: collections.deque[asyncio.Future[None]] = collections.deque()

    async def enter(self, switches: Switches) -> bool:
        """A place (waiting for it); False when the queue is full (answer 429)."""
        if self.serving < switches.capacity and not self.queue:
            self.serving += 1
            return True
        if len(self.queue) >= switches.queue_limit:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append(fut)
        await fut  # the place is handed over by leave()
        return True

    def leave(self) -> None:
        while self.queue:
            fut = self.queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.serving -= 1


async def _respond(
    request: web.Request, raw: bytes, switches: Switches, stats: Stats
) -> web.StreamResponse:
    """The answer to one request, once it is its turn to be served."""
    path = request.path
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        stats.status[400] += 1
        return _error(
            400, "We could not parse the JSON body of your request.", "invalid_request_error",
            path,
        )
    prompt = _prompt(body)
    stats.attempts[prompt] += 1
    if path == MESSAGES:
        refused = _messages_refusal(request, body, stats)
        if refused is not None:
            stats.status[refused.status] += 1
            return refused
    behaviour = _behaviour(switches, str(body.get("model", "")), prompt)
    if behaviour is not None:
        return await _odd_answer(request, behaviour, body, prompt, stats)
    failure = _injected_failure(switches, prompt, path)
    if failure is not None:
        stats.status[failure.status] += 1
        return failure
    stats.status[200] += 1
    stats.answered[prompt] += 1
    stats.answered_at[prompt] = time.time()
    reply = next((text for key, text in switches.replies.items() if key in prompt), None)
    id_header = "request-id" if path == MESSAGES else "x-request-id"
    return web.Response(
        body=orjson.dumps(answer(path, body, reply)),
        content_type="application/json",
        headers={id_header: f"req_{uuid.uuid4().hex}"},
    )


def make_app(latency: float = 0.0) -> web.Application:
    switches = Switches(latency=latency)
    stats = Stats()
    server = _Server()

    async def handle(request: web.Request) -> web.StreamResponse:
        stats.begin()
        entered = False
        try:
            raw = await request.read()
            if switches.capacity:
                entered = await server.enter(switches)
                if not entered:
                    stats.status[429] += 1
                    resp = _error(429, "The server is busy.", "rate_limit_error", request.path)
                    resp.headers["retry-after"] = "1"
                    return resp
            if switches.latency:
                await asyncio.sleep(switches.latency)
            return await _respond(request, raw, switches, stats)
        finally:
            if entered:
                server.leave()
            stats.end()

    async def control(request: web.Request) -> web.Response:
        for key, value in (await request.json()).items():
            if not hasattr(switches, key):
                return _error(400, f"unknown switch {key}", "invalid_request_error")
            setattr(switches, key, value)
        return web.json_response(vars(switches))

    async def get_stats(_: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(
                {
                    "requests": stats.requests,
                    "in_flight": stats.in_flight,
                    "max_in_flight": stats.max_in_flight,
                    "status": {str(k): v for k, v in stats.status.items()},
                    "answered": dict(stats.answered),
                    "attempts": dict(stats.attempts),
                    "answered_at": stats.answered_at,
                    "message_headers": dict(stats.message_headers),
                    "first_at": stats.first_at,
                    "last_at": stats.last_at,
                }
            ),
            content_type="application/json",
        )

    async def reset(_: web.Request) -> web.Response:
        nonlocal stats
        fresh = Stats()
        stats.requests, stats.max_in_flight = fresh.requests, stats.in_flight
        stats.status, stats.answered = fresh.status, fresh.answered
        stats.attempts, stats.answered_at = fresh.attempts, fresh.answered_at
        stats.message_headers = fresh.message_headers
        stats.first_at = stats.last_at = 0.0
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/_control", control)
    app.router.add_get("/_stats", get_stats)
    app.router.add_post("/_reset", reset)
    for path in (
        "chat/completions", "completions", "embeddings", "responses", "moderations", "messages"
    ):
        app.router.add_post(f"/v1/{path}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description="A fake OpenAI-compatible (and /v1/messages) upstream for tests and "
        "benchmarks.",
        epilog="At run time: POST /_control with a JSON object of switches ("
        + ", ".join(f.name for f in dataclasses.fields(Switches))
        + "; see the Switches class), GET /_stats for what it saw, POST /_reset to clear both.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds before each answer (default 0)"
    )
    args = parser.parse_args()
    import uvloop

    web.run_app(
        make_app(args.latency),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
