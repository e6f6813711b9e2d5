"""The streamed validator: codes, lines, shards, independent of chunk boundaries."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchd.models import new_id, normalise_endpoint
from batchd.service.idset import IdSet
from batchd.service.validation import Validator, mismatched_lines


def _line(cid: str, model: str = "m", url: str = "/v1/chat/completions", **body: Any) -> bytes:
    b = {"model": model, "messages": [], **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": b}).encode()


def run(data: bytes, chunk: int = 7, cls: type[Validator] = Validator, **kw: Any) -> Any:
    v = cls(
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


# -- the fast path (one typed decode per line) against the precise path ----------------------
class _PreciseOnly(Validator):
    """Every line through the precise path, as the validator worked before the fast path."""

    def _lines(self, buf: bytes, start: int, stop: int) -> None:
        pos = self._offset
        for raw in buf[start:stop].split(b"\n")[:-1]:
            self._line(raw, pos, pos + len(raw) + 1)
            pos += len(raw) + 1
        self._offset = pos


def _row(**fields: Any) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()


_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
_ODD_LINES = [
    _line("dup"),
    _line("dup"),  # duplicate
    b"",
    b"   \t",
    b"\x0b",  # bytes.isspace: skipped as blank
    b"{bad",
    b'"a string"',
    b"[1, 2]",
    b"null",
    b'{"custom_id": "x1", "method": "POST", "url": "/v1/chat/completions", "body": null}',
    b'{"custom_id": "x2", "method": "POST", "url": "/v1/chat/completions", "body": [1]}',
    b'{"custom_id": "x3", "method": "POST", "url": "/v1/chat/completions"}',
    b'{"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}',
    b"{}",
    _row(custom_id="", method="POST", url="/v1/chat/completions", body=_BODY),
    _row(custom_id=7, method="POST", url="/v1/chat/completions", body=_BODY),
    _row(custom_id="g", method="GET", url="/v1/chat/completions", body=_BODY),
    _row(custom_id="u", method="POST", url=5, body=_BODY),
    _row(custom_id="e", method="POST", url="/v1/embeddings", body={"model": "m", "input": "x"}),
    _row(custom_id="z", method="POST", url="/v1/images", body=_BODY),
    _row(custom_id="az", method="POST", url="/chat/completions?api-version=1", body=_BODY),
    _row(custom_id="nm", method="POST", url="/v1/chat/completions", body={"messages": []}),
    _row(custom_id="em", method="POST", url="/v1/chat/completions", body={"model": ""}),
    _row(custom_id="im", method="POST", url="/v1/chat/completions", body={"model": 3}),
    _line("m2", model="other"),
    _line("s1", stream=True),
    _line("s2", stream=False),
    _line("s3", stream=None),
    _line("s4", stream=0),
    _line("s5", stream="yes"),
    _line("t1", max_tokens=100),
    _line("t2", max_completion_tokens=50, max_tokens=100),
    _line("t3", max_output_tokens=7),
    _line("t4", max_tokens=True, max_output_tokens=-3),
    _line("t5", max_tokens=1.5),
    b'{"custom_id": "dk", "custom_id": "dk2", "method": "POST", "url": "/v1/chat/completions",'
    b' "body": {"model": "m", "model": 5}}',  # duplicate keys: the last one counts
    b'  {"custom_id": "ws", "method": "POST", "url": "/v1/chat/completions", "body": {"model":'
    b' "m"}}  \r',
    _row(
        custom_id="caf\u00e9",
        method="POST",
        url="/v1/chat/completions",
        body={"model": "m", "messages": [{"role": "user", "content": "\u00e9\u4e2d\U0001f600"}]},
    ),
    _row(custom_id="caf\u00e9", method="POST", url="/v1/chat/completions", body=_BODY),
    b'{"custom_id": "bad\xff", "method": "POST", "url": "/v1/chat/completions", "body": {}}',
    b'{"custom_id": "sur\\ud800", "method": "POST", "url": "/v1/chat/completions",'
    b' "body": {"model": "m"}}',
    _line("long", pad="x" * 300),
    _line("dup"),
]


def _both(data: bytes, chunk: int, **kw: Any) -> tuple[Any, Any]:
    return run(data, chunk, **kw), run(data, chunk, _PreciseOnly, **kw)


@pytest.mark.parametrize("chunk", [1, 3, 64, 500, 10**6])
@pytest.mark.parametrize(
    "kw", [{}, {"max_line_bytes": 200}, {"max_lines": 20}, {"shard_lines": 1000}]
)
def test_fast_path_matches_the_precise_path(chunk: int, kw: dict[str, Any]) -> None:
    data = b"\n".join(_ODD_LINES + [_line(f"ok{i}") for i in range(30)] + _ODD_LINES)
    fast, precise = _both(data, chunk, **kw)
    assert fast == precise
    assert fast.issues  # the corpus has issues of every kind
    for ending in (b"\n", b"\r\n"):
        fast, precise = _both(data + ending, chunk, **kw)
        assert fast == precise


def test_fast_path_leaves_good_lines_to_no_one_else(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    precise = Validator._line

    def spy(self: Validator, raw: bytes, start: int, end: int) -> None:
        calls.append(raw)
        precise(self, raw, start, end)

    monkeypatch.setattr(Validator, "_line", spy)
    good = [_line(f"c{i}", stream=False, max_tokens=5) for i in range(50)]
    s = run(b"\n".join([*good, _line("c7"), b"", _line("c50")]), chunk=1000)
    # The duplicate, the blank line and the last line (no newline: finish() checks it).
    assert calls == [_line("c7"), b"", _line("c50")]
    assert s.lines == 52 and [i.code for i in s.issues] == ["duplicate_custom_id"]


def test_fast_path_more_than_64_models_and_urls() -> None:
    rows = [_line(f"c{i}", model=f"m{i}", url=f"/v1/x{i}") for i in range(80)]
    fast, precise = _both(b"\n".join(rows), 1000)
    assert fast == precise and len(fast.models) == 64 and len(fast.urls) == 64


def test_id_set() -> None:
    ids = IdSet()
    words = [f"id-{i}" for i in range(5000)] + ["", "caf\u00e9", "\ud800", "\x00", "\U0001f600"]
    assert all(ids.add(w) for w in words)
    assert len(ids) == len(words)
    assert not any(ids.add(w) for w in words)
    assert len(ids) == len(words)
    assert all(w in ids for w in words)
    assert "id-5000" not in ids and "caf" not in ids and "id-1" + "0" * 5 not in ids
