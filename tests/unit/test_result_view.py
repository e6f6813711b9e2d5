"""How the dashboard shows a result line (``service/dashboard.py``: ``error_line``,
``answer_text``): who, what status, what the answer or the error says, for every endpoint's
answer shape and for bodies that are not what they should be."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchd.service.dashboard import ErrorLine, answer_text, error_line


def _line(status: int | None, body: Any = None, error: Any = None) -> bytes:
    response = None if status is None else {"status_code": status, "request_id": "r", "body": body}
    line = {"id": "batch_req_x_0", "custom_id": "c1", "response": response, "error": error}
    return orjson.dumps(line)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"choices": [{"message": {"role": "assistant", "content": "hello"}}]}, "hello"),
        ({"choices": [{"text": "completed text"}]}, "completed text"),
        ({"output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]},
         "hi"),
        ({"data": [{"embedding": [0.1, 0.2, 0.3]}, {"embedding": [0.0] * 3}]},
         "embedding of 3 dimensions (2 inputs)"),
        ({"choices": [{"message": {"content": None, "tool_calls": []}}]},
         '{"choices":[{"message":{"content":null,"tool_calls":[]}}]}'),
        ({"output": 5, "choices": "x", "data": {"a": 1}},
         '{"output":5,"choices":"x","data":{"a":1}}'),
        ({"output": [{"content": "text, not parts"}, 7]},
         '{"output":[{"content":"text, not parts"},7]}'),
        ([1, 2], "[1,2]"),
    ],
)
def test_answers_of_every_shape(body: Any, says: str) -> None:
    assert answer_text(body) == says
    assert error_line(_line(200, body)) == ErrorLine("c1", "200", says, ok=True)


def test_failures_and_requests_never_executed() -> None:
    rejected = _line(400, {"error": {"message": "bad prompt", "type": "invalid_request_error"}})
    assert error_line(rejected) == ErrorLine("c1", "400", "bad prompt")
    # A 2xx whose body is an error is not shown as an answer.
    odd = _line(200, {"error": {"message": "upstream said no"}})
    assert error_line(odd) == ErrorLine("c1", "200", "upstream said no")
    never = _line(None, error={"code": "batch_cancelled", "message": "The batch was cancelled."})
    assert error_line(never) == ErrorLine("c1", "batch_cancelled", "The batch was cancelled.")
    long = "x" * 2000
    shown = error_line(_line(200, {"choices": [{"message": {"content": long}}]}))
    assert shown.message == "x" * 500 and shown.ok
    assert error_line(b"{not json") == ErrorLine("?", "?", "{not json")
