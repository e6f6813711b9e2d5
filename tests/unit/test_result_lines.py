"""Every line batchd writes for an upstream's answer is valid UTF-8 JSON with the request's
custom_id, whatever the upstream sent (property-based: arbitrary bodies and statuses)."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.backends.base import UpstreamResponse
from batchd.engine.results import read_usage, result_line, usage_of_line
from batchd.models import Usage

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


def check(cid: str, status: int, body: bytes, request_id: str) -> None:
    encoded = msgspec.json.encode(cid)
    is_output, line, usage = result_line(encoded, UpstreamResponse(status, body, request_id))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    row = json.loads(line.decode("utf-8"))  # strict: a replacement on read would hide a defect
    assert row["custom_id"] == cid
    assert row["id"].startswith("batch_req_")
    response = row["response"]
    if is_output:
        assert 200 <= status < 300 and response["status_code"] == status
        assert isinstance(response["body"], dict)
        assert usage is not None
        assert usage_of_line(line) == usage
    elif response is not None:
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
    is_output, line, usage = result_line(b'"c"', UpstreamResponse(200, body, "r"))
    assert is_output and usage == Usage()
    assert json.loads(line)["response"]["body"] == json.loads(body)
    assert body in line  # the bytes as sent: no parse and dump


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
    is_output, line, usage = result_line(b'"c"', UpstreamResponse(200, body, "r"))
    assert is_output and usage == Usage(input_tokens=1)
    assert json.loads(line.decode("utf-8"))["response"]["body"]["text"] == "ok \ufffd\ufffd end"


def test_huge_usage_is_capped_so_a_batchs_sums_fit() -> None:
    from batchd.engine.results import MAX_TOKENS_PER_ANSWER

    usage = read_usage({"prompt_tokens": 2**63 - 1, "completion_tokens": 10**29})
    assert usage.input_tokens == usage.output_tokens == MAX_TOKENS_PER_ANSWER
    assert 100_000 * MAX_TOKENS_PER_ANSWER < 2**63  # 100,000 such answers still fit


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
