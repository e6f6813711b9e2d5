"""Messages params <-> chat completions (service/messages_format.py)."""

from __future__ import annotations

import pytest

from batchd.errors import InvalidRequest
from batchd.service.messages_format import chat_body, message_of, messages_body, result_line


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
    cancelled = {
        "custom_id": "a",
        "response": None,
        "error": {"code": "batch_cancelled", "message": "x"},
    }
    assert result_line(cancelled) == {"custom_id": "a", "result": {"type": "canceled"}}
    timeout = {
        "custom_id": "b",
        "response": {"status_code": 504, "body": {"error": {"message": "upstream timed out"}}},
        "error": None,
    }
    assert result_line(timeout)["result"]["error"] == {
        "type": "error",
        "error": {"type": "timeout_error", "message": "upstream timed out"},
    }


# -- /v1/messages upstreams (api_style = "anthropic"): params and answers pass through ------
MESSAGES = "/v1/messages"


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
    line = {"id": "batch_req_1", "custom_id": "a",
            "response": {"status_code": 200, "request_id": "r", "body": message}, "error": None}
    assert result_line(line, MESSAGES) == {
        "custom_id": "a", "result": {"type": "succeeded", "message": message}
    }
    # the same body on a translated batch is read as a chat completion (and is empty)
    assert result_line(line)["result"]["message"]["content"] == []


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
    line = {"id": "batch_req_1", "custom_id": "e",
            "response": {"status_code": status, "request_id": "r", "body": body}, "error": None}
    assert result_line(line, MESSAGES) == {
        "custom_id": "e",
        "result": {"type": "errored",
                   "error": {"type": "error", "error": {"type": kind, "message": text}}},
    }


def test_a_translated_batch_types_errors_by_status() -> None:
    body = {"error": {"type": "overloaded_error", "message": "busy"}}
    line = {"custom_id": "e", "response": {"status_code": 400, "body": body}, "error": None}
    assert result_line(line)["result"]["error"]["error"]["type"] == "invalid_request_error"
