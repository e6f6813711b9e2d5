"""The two error envelopes (batchd/envelopes.py): their exact bytes, and every body built
through them."""

from __future__ import annotations

import orjson
import pytest

from batchd.envelopes import (
    anthropic_error,
    anthropic_error_type,
    openai_error,
    openai_error_type,
)
from batchd.results.anthropic import errored


def test_openai_envelope_bytes() -> None:
    assert orjson.dumps(openai_error("No such file.", "invalid_request_error")) == (
        b'{"error":{"message":"No such file.","type":"invalid_request_error",'
        b'"param":null,"code":null}}'
    )
    assert orjson.dumps(openai_error("m", "t", param="p", code="c")) == (
        b'{"error":{"message":"m","type":"t","param":"p","code":"c"}}'
    )


def test_openai_envelope_extra_fields_follow_code() -> None:
    """Azure's content filter refusal adds ``status`` and ``innererror`` after ``code``."""
    body = openai_error("m", "t", code="content_filter", status=400, innererror={"code": "X"})
    assert orjson.dumps(body) == (
        b'{"error":{"message":"m","type":"t","param":null,"code":"content_filter",'
        b'"status":400,"innererror":{"code":"X"}}}'
    )


def test_each_call_builds_a_new_body() -> None:
    first = openai_error("m", "t")
    first["error"]["code"] = "changed"
    assert openai_error("m", "t")["error"]["code"] is None


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "invalid_request_error"),
        (416, "invalid_request_error"),
        (429, "rate_limit_error"),
        (431, "server_error"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_openai_types_by_status(status: int, type_: str) -> None:
    assert openai_error_type(status) == type_


def test_anthropic_envelope_bytes() -> None:
    assert orjson.dumps(anthropic_error("Not found.", "not_found_error")) == (
        b'{"type":"error","error":{"type":"not_found_error","message":"Not found."}}'
    )


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (413, "request_too_large"),
        (500, "api_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_anthropic_types_by_status(status: int, type_: str) -> None:
    assert anthropic_error_type(status) == type_


def test_anthropic_result_line_error_uses_the_envelope() -> None:
    """A result line's error is the envelope, with the one type the SDK does not accept
    there (``request_too_large``) read as ``invalid_request_error``, and the type an
    Anthropic upstream named kept when the SDK accepts it."""
    assert errored("a", 413, "too big") == {
        "custom_id": "a",
        "result": {
            "type": "errored",
            "error": anthropic_error("too big", "invalid_request_error"),
        },
    }
    assert errored("b", 504, "slow")["result"]["error"] == anthropic_error(
        "slow", "timeout_error"
    )
    assert errored("c", 529, "busy", "overloaded_error")["result"]["error"] == anthropic_error(
        "busy", "overloaded_error"
    )
    assert errored("d", 500, "odd", "made_up_error")["result"]["error"] == anthropic_error(
        "odd", "api_error"
    )
