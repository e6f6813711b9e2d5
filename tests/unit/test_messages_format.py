"""Messages params <-> chat completions (service/messages_format.py)."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from batchd.errors import InvalidRequest
from batchd.results.anthropic import anthropic_line
from batchd.results.record import Record, RecordError
from batchd.service.messages_format import chat_body, message_of, messages_body


def test_params_become_a_chat_body_with_tools() -> None:
    body = chat_body(
        {
            "model": "m",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Looking."},
                        {"type": "tool_use", "id": "t1", "name": "get", "input": {"city": "Oslo"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "4C"},
                        {"type": "text", "text": "and?"},
                    ],
                },
            ],
            "stop_sequences": ["###"],
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 5,
            "tools": [{"name": "get", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        }
    )
    assert body == {
        "model": "m",
        "max_tokens": 10,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "Looking.",
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "get", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "4C"},
            {"role": "user", "content": "and?"},
        ],
        "stop": ["###"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "tools": [
            {
                "type": "function",
                "function": {"name": "get", "parameters": {"type": "object"}, "description": "d"},
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (
            {"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]},
            "messages.0.role",
        ),
        (
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 2,
            },
            "temperature",
        ),
        (
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
            },
            "stream",
        ),
    ],
)
def test_bad_params_name_the_field(params: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        chat_body(params)
    assert err.value.param == param


def test_a_tool_call_answer_becomes_tool_use_blocks() -> None:
    msg = message_of(
        {
            "model": "m",
            "choices": [
                {
                    "message": {
                        "content": None,
                        "tool_calls": [
                            {"id": "c1", "function": {"name": "get", "arguments": '{"a":1}'}}
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {
                "prompt_tokens": 7,
                "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
        },
        "msg_1",
    )
    assert msg["content"] == [{"type": "tool_use", "id": "c1", "name": "get", "input": {"a": 1}}]
    assert msg["stop_reason"] == "tool_use"
    assert msg["usage"] == {
        "input_tokens": 7,
        "output_tokens": 2,
        "cache_read_input_tokens": 4,
        "cache_creation_input_tokens": 0,
    }


@pytest.mark.parametrize(
    ("choice", "reason", "sequence"),
    [
        ({"finish_reason": "stop", "stop_reason": "###"}, "stop_sequence", "###"),
        ({"finish_reason": "stop", "stop_reason": None}, "end_turn", None),
        ({"finish_reason": "length"}, "max_tokens", None),
    ],
)
def test_stop_reasons(choice: dict[str, object], reason: str, sequence: str | None) -> None:
    msg = message_of({"choices": [{"message": {"content": "hi"}, **choice}]}, "msg_1")
    assert (msg["stop_reason"], msg["stop_sequence"]) == (reason, sequence)


def test_unexecuted_and_transport_failures() -> None:
    cancelled = Record("a", "cancelled", error=RecordError("batch_cancelled", "x"))
    chat = "/v1/chat/completions"
    canceled = {"custom_id": "a", "result": {"type": "canceled"}}
    assert anthropic_line(cancelled, chat, "m") == canceled
    expired = Record("e", "expired", error=RecordError("batch_expired", "x"))
    assert anthropic_line(expired, chat, "m")["result"] == {"type": "expired"}
    timeout = Record(
        "b", "failed", 504, "r", body=msgspec.Raw(b'{"error":{"message":"upstream timed out"}}')
    )
    assert anthropic_line(timeout, chat, "m")["result"]["error"] == {
        "type": "error",
        "error": {"type": "timeout_error", "message": "upstream timed out"},
    }
    lost = Record("c", "failed", error=RecordError("backend_unavailable", "no route"))
    assert anthropic_line(lost, chat, "m")["result"]["error"]["error"] == {
        "type": "api_error",  # the type of a 500, one a result line may carry
        "message": "no route",
    }


def test_succeeded_bodies_by_endpoint() -> None:
    completion = b'{"model":"m","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}]}'
    rec = Record("a", "succeeded", 200, "r", body=msgspec.Raw(completion))
    line = anthropic_line(rec, "/v1/chat/completions", "msg_x_3")
    assert line["result"]["message"]["id"] == "msg_x_3"
    assert line["result"]["message"]["content"] == [{"type": "text", "text": "hi"}]
    message = b'{"id":"msg_up","type":"message","content":[]}'
    rec = Record("a", "succeeded", 200, "r", body=msgspec.Raw(message))
    passed = anthropic_line(rec, "/v1/messages", "msg_x_3")["result"]["message"]
    assert passed == {"id": "msg_up", "type": "message", "content": []}  # as the upstream sent


# -- /v1/messages upstreams (api_style = "anthropic"): params and answers pass through ------
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"


def test_params_pass_through_unchanged() -> None:
    params = {
        "model": "m",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},  # refused when translated
        "anything": [1, {"x": None}],
    }
    assert messages_body(params) is params
    assert messages_body({**params, "stream": False})["stream"] is False
    with pytest.raises(InvalidRequest) as exc:
        chat_body(params)
    assert exc.value.param == "anything"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ("x", "params"),
        ({"max_tokens": 1, "messages": [{}]}, "model"),
        ({"model": "m", "max_tokens": 0, "messages": [{}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 1, "messages": []}, "messages"),
        ({"model": "m", "max_tokens": 1, "messages": [{}], "stream": True}, "stream"),
    ],
)
def test_passed_through_params_still_need_the_required_fields(params: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        messages_body(params)
    assert exc.value.param == param


def test_a_message_passes_through_as_received() -> None:
    message = {
        "id": "msg_upstream",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "hi"}],
        "stop_reason": "pause_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 2, "service_tier": "standard"},
        "container": None,
    }
    rec = Record("a", "succeeded", 200, "r", body=msgspec.Raw(orjson.dumps(message)))
    assert anthropic_line(rec, MESSAGES, "msg_1") == {
        "custom_id": "a", "result": {"type": "succeeded", "message": message}
    }
    # the same body on a translated batch is read as a chat completion (and is empty)
    assert anthropic_line(rec, CHAT, "msg_1")["result"]["message"]["content"] == []


@pytest.mark.parametrize(
    ("status", "body", "kind", "text"),
    [
        # the upstream's own type is kept ...
        (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
         "overloaded_error", "Overloaded"),
        (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}},
         "invalid_request_error", "x"),
        (500, {"type": "error", "error": {"type": "api_error", "message": "boom"}},
         "api_error", "boom"),
        # ... unless the SDK cannot read it in a result: then the status's
        (413, {"type": "error", "error": {"type": "request_too_large", "message": "big"}},
         "invalid_request_error", "big"),
        (503, {"type": "error", "error": {"type": "made_up", "message": "m"}}, "api_error", "m"),
        # a body batchd wrapped (the upstream's was not JSON)
        (502, {"error": {"type": "upstream_error", "message": "<html>"}}, "api_error", "<html>"),
    ],
)
def test_an_upstream_error_keeps_its_type(
    status: int, body: dict[str, object], kind: str, text: str
) -> None:
    rec = Record("e", "failed", status, "r", body=msgspec.Raw(orjson.dumps(body)))
    assert anthropic_line(rec, MESSAGES, "msg_1") == {
        "custom_id": "e",
        "result": {"type": "errored",
                   "error": {"type": "error", "error": {"type": kind, "message": text}}},
    }


def test_a_translated_batch_types_errors_by_status() -> None:
    body = {"error": {"type": "overloaded_error", "message": "busy"}}
    rec = Record("e", "failed", 400, body=msgspec.Raw(orjson.dumps(body)))
    assert anthropic_line(rec, CHAT, "msg_1")["result"]["error"]["error"]["type"] == (
        "invalid_request_error"
    )
