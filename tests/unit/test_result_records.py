"""Result records: every record batchd writes for an upstream's answer decodes back to what
was answered, and every OpenAI line rendered from it is valid strict UTF-8 JSON with the
request's custom_id and the fields of CONTRACT.md's line shapes, whatever the upstream sent
(property-based: arbitrary bodies, statuses, custom_ids)."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.backends.base import UpstreamResponse
from batchd.models import Usage
from batchd.results.answer import MAX_TOKENS_PER_ANSWER, answer_record, failure_record, read_usage
from batchd.results.openai import openai_line, render_part
from batchd.results.record import (
    Record,
    decode,
    decode_records,
    encode,
    line_id,
    position_of,
    unanswered,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def bodies() -> st.SearchStrategy[bytes]:
    as_json = json_values.map(lambda v: json.dumps(v).encode())
    objects = st.dictionaries(st.text(), json_values, max_size=5).map(
        lambda v: json.dumps(v, indent=1, ensure_ascii=False).encode()  # newlines inside
    )
    mangled = st.tuples(objects, st.binary(min_size=1, max_size=4), st.integers(0, 50)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    )
    deep = st.integers(1, 3000).map(lambda n: b'{"a":' + b"[" * n + b"]" * n + b"}")
    return st.binary(max_size=200) | as_json | objects | mangled | deep


def check(cid: str, status: int, body: bytes, request_id: str, pos: int = 7) -> None:
    encoded = msgspec.json.encode(cid)
    ok, line, usage = answer_record(encoded, UpstreamResponse(status, body, request_id), 100.0)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    json.loads(line.decode("utf-8"))  # the record itself: strict UTF-8 JSON
    rec = decode(line)
    assert rec.custom_id == cid and rec.succeeded == ok
    assert decode(encode(rec)) == rec  # a record re-encoded reads back the same
    out = openai_line("batch_abc", pos, rec)
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    row = json.loads(out.decode("utf-8"))  # strict: a replacement on read would hide a defect
    assert list(row) == ["id", "custom_id", "response", "error"]
    assert row["custom_id"] == cid
    assert row["id"] == "batch_req_abc_7" and position_of("batch_abc", row["id"]) == pos
    response = row["response"]
    if ok:
        assert 200 <= status < 300 and rec.outcome == "succeeded"
        assert list(response) == ["status_code", "request_id", "body"]
        assert response["status_code"] == status and response["request_id"] == request_id
        assert isinstance(response["body"], dict) and row["error"] is None
        assert usage is not None and rec.tokens() == usage
        assert usage == read_usage(response["body"].get("usage"))
    elif response is not None:
        assert rec.outcome == "failed" and row["error"] is None
        assert isinstance(response["body"], dict)
        assert response["status_code"] == (502 if 200 <= status < 300 else status)
    else:
        assert row["error"]["code"] == "internal_error"


@settings(max_examples=400, deadline=None)
@given(
    cid=st.text(min_size=1, max_size=20),
    status=st.sampled_from([200, 201, 204, 400, 404, 408, 429, 500, 502, 503]),
    body=bodies(),
    request_id=st.text(max_size=10),
)
def test_every_result_line_parses(cid: str, status: int, body: bytes, request_id: str) -> None:
    check(cid, status, body, request_id)


def test_a_2xx_json_object_is_kept_as_sent() -> None:
    body = b'{"id":"x","choices":[{"message":{"content":"caf\xc3\xa9"}}],"usage":null}'
    is_output, line, usage = answer_record(b'"c"', UpstreamResponse(200, body, "r"), 1.0)
    assert is_output and usage == Usage()
    assert json.loads(line)["body"] == json.loads(body)
    assert body in line  # the bytes as sent: no parse and dump
    assert body in openai_line("batch_x", 0, decode(line))  # and spliced as they are


def test_usage_is_read_leniently() -> None:
    assert read_usage(
        {
            "prompt_tokens": 7.9,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": None},
            "completion_tokens_details": {"reasoning_tokens": 2},
            "extra": [1],
        }
    ) == Usage(input_tokens=7, cached_tokens=0, output_tokens=3, reasoning_tokens=2)
    odd = {"input_tokens": 5, "output_tokens": "9", "input_tokens_details": 3}
    assert read_usage(odd) == Usage(input_tokens=5)
    assert read_usage(None) == Usage() and read_usage([1, 2]) == Usage()
    assert read_usage({"prompt_tokens": True, "completion_tokens": float("inf")}) == Usage()


def test_invalid_utf8_is_repaired_not_dropped() -> None:
    body = b'{"text":"ok \xff\xfe end","usage":{"prompt_tokens":1}}'
    is_output, line, usage = answer_record(b'"c"', UpstreamResponse(200, body, "r"), 1.0)
    assert is_output and usage == Usage(input_tokens=1)
    assert json.loads(line.decode("utf-8"))["body"]["text"] == "ok \ufffd\ufffd end"


def test_huge_usage_is_capped_so_a_batchs_sums_fit() -> None:
    usage = read_usage({"prompt_tokens": 2**63 - 1, "completion_tokens": 10**29})
    assert usage.input_tokens == usage.output_tokens == MAX_TOKENS_PER_ANSWER
    assert 100_000 * MAX_TOKENS_PER_ANSWER < 2**63  # 100,000 such answers still fit


@settings(max_examples=200, deadline=None)
@given(
    cid=st.text(max_size=20) | st.none(),
    code=st.sampled_from(["invalid_request", "model_not_found", "backend_unavailable"]),
    message=st.text(max_size=40),
    outcome=st.sampled_from(["failed", "cancelled", "expired"]),
    executed=st.booleans(),
)
def test_records_without_an_answer_render_the_error_shape(
    cid: str | None, code: str, message: str, outcome: str, executed: bool
) -> None:
    encoded = msgspec.json.encode(cid)
    if executed:
        line = failure_record(encoded, code, message, 5.0)
    else:
        line = unanswered(encoded, code, message, outcome=outcome)  # type: ignore[arg-type]
    rec = decode(line)
    assert rec.custom_id == cid and rec.status_code is None and rec.body == NULL_BODY
    assert (rec.started_at is not None) == executed
    row = json.loads(openai_line("batch_z9", 12, rec).decode("utf-8"))
    assert row == {
        "id": "batch_req_z9_12",
        "custom_id": cid,
        "response": None,
        "error": {"code": code, "message": message},
    }


def test_a_part_renders_in_position_order_into_output_and_error() -> None:
    ok = answer_record(b'"a"', UpstreamResponse(200, b'{"n":1}', "r1"), 1.0)[1]
    bad = answer_record(b'"b"', UpstreamResponse(404, b'{"e":2}', "r2"), 1.0)[1]
    gone = unanswered(b'"c"', "batch_expired", "late", outcome="expired")
    data = ok + bad + gone + ok
    assert [r.custom_id for r in decode_records(data)] == ["a", "b", "c", "a"]
    out, err, n_out, n_err = render_part("batch_q", 40, data)
    assert (n_out, n_err) == (2, 2)
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["batch_req_q_40", "batch_req_q_43"]
    assert [json.loads(x)["id"] for x in err.splitlines()] == ["batch_req_q_41", "batch_req_q_42"]


def test_line_ids_are_cursors_of_one_batch() -> None:
    assert line_id("batch_abc", 0) == "batch_req_abc_0"
    assert position_of("batch_abc", "batch_req_abc_120") == 120
    for other in ("batch_req_abd_1", "batch_req_abc_", "batch_req_abc_01", "batch_req_abc_-1",
                  "batch_req_abc_1x", "batch_req_abc_\u0661", "x"):
        assert position_of("batch_abc", other) is None


NULL_BODY = Record("x", "failed").body


def test_anthropic_usage_counts_the_cache_in_the_input() -> None:
    """Anthropic's input_tokens leave out cache reads and writes; OpenAI's include them."""
    usage = {
        "input_tokens": 10,
        "output_tokens": 4,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 7,
    }
    assert read_usage(usage) == Usage(input_tokens=117, cached_tokens=100, output_tokens=4)
    assert read_usage({"input_tokens": 3, "output_tokens": 2, "cache_read_input_tokens": None,
                       "cache_creation_input_tokens": 0}) == Usage(input_tokens=3,
                                                                   output_tokens=2)
    # the responses API's shape is unchanged (its input_tokens include the cached ones)
    assert read_usage(
        {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 1}
    ) == Usage(input_tokens=5, cached_tokens=2, output_tokens=1)
