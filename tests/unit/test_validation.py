"""The streamed validator: codes, lines, shards, independent of chunk boundaries."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchd.backends.base import normalise_endpoint
from batchd.models import new_id
from batchd.service.validation import Validator, mismatched_lines


def _line(cid: str, model: str = "m", url: str = "/v1/chat/completions", **body: Any) -> bytes:
    b = {"model": model, "messages": [], **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": b}).encode()


def run(data: bytes, chunk: int = 7, **kw: Any) -> Any:
    v = Validator(
        max_lines=kw.get("max_lines", 1000),
        max_line_bytes=kw.get("max_line_bytes", 10**6),
        shard_lines=kw.get("shard_lines", 3),
    )
    for i in range(0, len(data), chunk):
        v.feed(data[i : i + chunk])
    return v.finish()


@pytest.mark.parametrize("chunk", [1, 5, 64, 10**6])
def test_shards_cover_every_line_whatever_the_chunks(chunk: int) -> None:
    lines = [_line(f"c{i}") for i in range(10)]
    data = (
        b"\n".join(lines[:5]) + b"\n\n" + b"\r\n".join(lines[5:])
    )  # blank line, CRLF, no final \n
    s = run(data, chunk)
    assert s.issues == [] and s.lines == 10
    assert [sh.count for sh in s.shards] == [3, 3, 3, 1]
    assert s.shards[0].start == 0 and s.shards[-1].end == len(data)
    for a, b in zip(s.shards, s.shards[1:], strict=False):
        assert a.end == b.start
    # Each shard's bytes hold exactly its lines, starting at its first line number.
    assert s.shards[1].first_line == 4 and s.shards[2].first_line == 8  # line 6 is blank
    text = data[s.shards[1].start : s.shards[1].end]
    assert [json.loads(x)["custom_id"] for x in text.split(b"\n") if x.strip()] == [
        "c3",
        "c4",
        "c5",
    ]
    assert s.models == {"m": [10, *range(1, 6), *range(7, 12)]}


def test_codes_and_lines() -> None:
    rows = [
        _line("a"),
        b'{"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
        _line("a"),
        _line("d", stream=True),
        _line("e", model="other"),
    ]
    s = run(b"\n".join(rows))
    got = [(i.code, i.line, i.param) for i in s.issues]
    assert ("invalid_request", 2, "method") in got
    assert ("missing_required_parameter", 2, "body.model") in got
    assert ("duplicate_custom_id", 3, "custom_id") in got
    assert ("streaming_unsupported", 4, "body.stream") in got
    assert ("model_mismatch", 5, "body.model") in got
    assert s.jsonl_ok


def test_not_jsonl_and_limits() -> None:
    s = run(_line("a") + b"\n{bad\n" + b'"str"\n')
    assert not s.jsonl_ok
    assert [(i.code, i.line) for i in s.issues] == [
        ("invalid_json_line", 2),
        ("invalid_json_line", 3),
    ]
    s = run(b"\n".join(_line(f"c{i}") for i in range(5)), max_lines=3)
    assert [i.code for i in s.issues] == ["too_many_tasks"]
    s = run(_line("a", pad="x" * 200), max_line_bytes=100)
    assert [i.code for i in s.issues] == ["invalid_json_line"]
    assert [i.code for i in run(b"\n \n").issues] == ["empty_file"]


def test_url_mismatch_uses_canonical_urls() -> None:
    s = run(b"\n".join([_line("a", url="/chat/completions"), _line("b", url="/v1/embeddings")]))
    assert mismatched_lines(s, "/v1/chat/completions") == [(2, "/v1/embeddings")]
    assert mismatched_lines(s, "/v1/embeddings") == [(1, "/v1/chat/completions")]


def test_endpoints_and_ids() -> None:
    assert normalise_endpoint("/chat/completions") == "/v1/chat/completions"
    assert normalise_endpoint("/v1/embeddings") == "/v1/embeddings"
    assert normalise_endpoint("/v1/images") is None
    ids = [new_id("batch_") for _ in range(200)]
    # Time-ordered: ids of later milliseconds sort later (pagination depends on it).
    assert ids[0][:19] <= ids[-1][:19]
