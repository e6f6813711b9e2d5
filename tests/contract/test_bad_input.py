"""Bad input gets a clear error in the OpenAI shape, or a failed batch with code and line;
nothing is left behind, nothing is a 5xx, and the server keeps answering."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.conftest import API_KEY, OTHER_KEY, base_config
from tests.support import Server, Upstream, chat_lines, wait_batch


def raw(
    server: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, Any]]:
    req = urllib.request.Request(server.url + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {API_KEY}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, json.loads(exc.read())


def assert_envelope(status: int, headers: Any, body: dict[str, Any], want: int) -> dict[str, Any]:
    assert status == want, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if 400 <= want < 500:
        assert headers["x-should-retry"] == "false"
    return err


def line(
    cid: Any = "a",
    method: Any = "POST",
    url: Any = "/v1/chat/completions",
    body: Any = None,
    drop: str | None = None,
) -> dict[str, Any]:
    row = {
        "custom_id": cid,
        "method": method,
        "url": url,
        "body": body if body is not None else {"model": "gpt-4o", "messages": []},
    }
    if drop:
        row.pop(drop)
    return row


def jsonl(*rows: dict[str, Any]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


@pytest.fixture
def c(client: OpenAI) -> Iterator[OpenAI]:
    yield client


def failed_batch(c: OpenAI, data: bytes, endpoint: str = "/v1/chat/completions") -> Any:
    file = c.files.create(file=("in.jsonl", data), purpose="batch")
    batch = c.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")
    batch = wait_batch(c, batch.id, timeout=20)
    assert batch.status == "failed", batch
    assert batch.failed_at
    return batch


def chat_body(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


def codes(batch: Any) -> list[tuple[str, int | None, str | None]]:
    return [(e.code, e.line, e.param) for e in batch.errors.data]


# -- files that are not JSONL: the file ends in "error"; a batch on it is created and fails
# with every bad line in errors.data (as OpenAI does), never a 400 naming only one ------------
def create_failed(c: OpenAI, data: bytes) -> Any:
    file = c.files.create(file=("bad.jsonl", data), purpose="batch")
    file = c.files.wait_for_processing(file.id, poll_interval=0.1)
    batch = c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_batch(c, batch.id, timeout=10)
    assert batch.status == "failed", batch
    assert batch.failed_at is not None and batch.output_file_id is None
    return file, batch


@pytest.mark.parametrize(
    ("data", "bad_line"),
    [
        (b'{"custom_id": "a"}\n{not json}\n', 2),
        (b'{"custom_id": "a", "x": "\xff\xfe"}\n', 1),
        (b"[1, 2]\n", 1),
        (b'{"custom_id": "a", "body": ' + b"[" * 1500 + b"]" * 1500 + b"}\n", 1),
    ],
    ids=["invalid-json", "non-utf8", "not-an-object", "nested-1500-deep"],
)
def test_not_jsonl(c: OpenAI, data: bytes, bad_line: int) -> None:
    file, batch = create_failed(c, data)
    assert file.status == "error"
    assert f"Line {bad_line}" in (file.status_details or "")
    assert ("invalid_json_line", bad_line, None) in codes(batch)


def test_every_bad_line_is_listed(c: OpenAI) -> None:
    """Two invalid JSON lines and a duplicate custom_id: all three, with their lines."""
    good = [json.dumps(line(cid=f"r{i}")).encode() for i in range(4)]
    dup = json.dumps(line(cid="r0")).encode()
    rows = [good[0], b"{oops", good[1], b'{"custom_id": "r1"', good[2], dup, good[3]]
    data = b"\n".join(rows) + b"\n"
    file, batch = create_failed(c, data)
    assert file.status_details is not None
    assert file.status_details.endswith("(3 problems, on lines 2, 4, 6)")
    assert codes(batch) == [
        ("invalid_json_line", 2, None),
        ("invalid_json_line", 4, None),
        ("duplicate_custom_id", 6, "custom_id"),
    ]


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("max_tokens", "100", "body.max_tokens"),
        ("max_tokens", 10**20, "body.max_tokens"),
        ("max_tokens", -1, "body.max_tokens"),
        ("max_tokens", 2**31, "body.max_tokens"),
        ("max_completion_tokens", 1.5, "body.max_completion_tokens"),
        ("max_tokens", True, "body.max_tokens"),
        ("n", 0, "body.n"),
        ("n", "2", "body.n"),
    ],
)
def test_wrong_types_of_read_fields(c: OpenAI, field: str, value: Any, param: str) -> None:
    """A body field batchd reads, of the wrong type or range: invalid_request naming it, in a
    failed batch (never a 500, never a batch whose shard the engine cannot read)."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], field: value}
    data = (
        json.dumps(line(cid="ok")).encode()
        + b"\n"
        + json.dumps(line(cid="bad", body=body)).encode()
        + b"\n"
    )
    _, batch = create_failed(c, data)
    assert codes(batch) == [("invalid_request", 2, param)]


def test_bom_crlf_and_no_final_newline(c: OpenAI, upstream: Upstream) -> None:
    """A leading UTF-8 BOM is skipped; CRLF line ends and a missing final newline are fine."""
    rows = [json.dumps(line(cid=f"w{i}", body=chat_body(f"w{i}"))) for i in range(3)]
    data = b"\xef\xbb\xbf" + "\r\n".join(rows).encode()
    file = c.files.create(file=("win.jsonl", data), purpose="batch")
    file = c.files.wait_for_processing(file.id, poll_interval=0.1)
    assert file.status == "processed", file.status_details
    batch = c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_batch(c, batch.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts is not None and batch.request_counts.completed == 3
    assert batch.output_file_id is not None
    out = [json.loads(x) for x in c.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == ["w0", "w1", "w2"]


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_files(c: OpenAI, data: bytes) -> None:
    file, batch = create_failed(c, data)
    assert file.status == "error"
    assert codes(batch) == [("empty_file", None, None)]


def test_created_while_validating_then_fails(c: OpenAI) -> None:
    """A batch made right after the upload of a bad file fails with the line."""
    data = jsonl(line("a")) + b"{oops\n"
    file = c.files.create(file=("in.jsonl", data), purpose="batch")
    try:
        batch = c.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    except openai.BadRequestError as exc:  # the check ended first: refused at once
        assert exc.code == "invalid_json_line"
        return
    batch = wait_batch(c, batch.id, timeout=20)
    assert batch.status == "failed"
    assert ("invalid_json_line", 2, None) in codes(batch)


# -- line problems: the batch fails, listing every bad line ---------------------------------
def test_missing_fields_each_reported(c: OpenAI) -> None:
    batch = failed_batch(
        c,
        jsonl(
            line("a", drop="custom_id"),
            line("b", drop="method"),
            line("c", drop="url"),
            line("d", drop="body"),
            line("e"),
        ),
    )
    assert codes(batch) == [
        ("missing_required_parameter", 1, "custom_id"),
        ("missing_required_parameter", 2, "method"),
        ("missing_required_parameter", 3, "url"),
        ("missing_required_parameter", 4, "body"),
    ]


def test_wrong_types_and_method(c: OpenAI) -> None:
    batch = failed_batch(
        c,
        jsonl(
            line(5),
            line("b", method="GET"),
            line("c", url=7),
            line("d", body=[1]),
            line("e"),
        ),
    )
    assert codes(batch) == [
        ("invalid_request", 1, "custom_id"),
        ("invalid_request", 2, "method"),
        ("invalid_request", 3, "url"),
        ("invalid_request", 4, "body"),
    ]


def test_duplicate_custom_id(c: OpenAI) -> None:
    batch = failed_batch(c, jsonl(line("a"), line("b"), line("a"), line("a")))
    assert codes(batch) == [
        ("duplicate_custom_id", 3, "custom_id"),
        ("duplicate_custom_id", 4, "custom_id"),
    ]


def test_url_mismatch(c: OpenAI) -> None:
    batch = failed_batch(c, jsonl(line("a"), line("b", url="/v1/embeddings"), line("c")))
    assert codes(batch) == [("url_mismatch", 2, "url")]


def test_azure_style_line_urls_match(c: OpenAI) -> None:
    file = c.files.create(
        file=("in.jsonl", jsonl(line("a", url="/chat/completions"))), purpose="batch"
    )
    batch = c.batches.create(
        input_file_id=file.id, endpoint="/chat/completions", completion_window="24h"
    )
    assert wait_batch(c, batch.id).status == "completed"


def test_two_models(c: OpenAI) -> None:
    other = {"model": "gpt-4o-mini", "messages": []}
    batch = failed_batch(c, jsonl(line("a"), line("b", body=other)))
    assert codes(batch) == [("model_mismatch", 2, "body.model")]


def test_model_without_deployment(c: OpenAI) -> None:
    batch = failed_batch(c, jsonl(line("a", body={"model": "nope", "messages": []})))
    assert codes(batch) == [("model_not_found", 1, "body.model")]


def test_streaming(c: OpenAI) -> None:
    body = {"model": "gpt-4o", "messages": [], "stream": True}
    batch = failed_batch(c, jsonl(line("a"), line("b", body=body)))
    assert codes(batch) == [("streaming_unsupported", 2, "body.stream")]


def test_report_caps_at_100_lines(c: OpenAI) -> None:
    batch = failed_batch(c, jsonl(*[line("same") for _ in range(150)]))
    assert len(batch.errors.data) == 100
    assert batch.errors.data[0].line == 2


# -- limits -----------------------------------------------------------------------------------
@pytest.fixture
def small(make_server: Callable[..., Server], upstream: Upstream) -> Server:
    return make_server(
        base_config(
            upstream,
            limits={
                "max_requests_per_file": 5,
                "max_file_bytes": 100_000,
                "completion_windows": ["24h"],
            },
        )
    )


def test_too_many_tasks(small: Server, sdk: Callable[..., OpenAI]) -> None:
    c = sdk(small)
    batch = failed_batch(c, chat_lines(6))
    assert codes(batch) == [("too_many_tasks", None, None)]


def test_file_too_large_leaves_nothing(small: Server, sdk: Callable[..., OpenAI]) -> None:
    c = sdk(small)
    with pytest.raises(openai.APIStatusError) as exc:
        c.files.create(file=("big.jsonl", b"x" * 200_000), purpose="batch")
    assert exc.value.status_code == 413
    assert exc.value.code == "file_too_large"
    # Streamed without a length header: refused while streaming, nothing kept either.
    boundary = "b0undary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.jsonl"\r\n\r\n'
        ).encode()
        for _ in range(20):
            yield b"y" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    req = urllib.request.Request(small.url + "/v1/files", data=body(), method="POST")
    req.add_header("Authorization", f"Bearer {API_KEY}")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    req.add_header("Transfer-Encoding", "chunked")
    with pytest.raises(urllib.error.HTTPError) as http_exc:
        urllib.request.urlopen(req, timeout=30)
    assert http_exc.value.code == 413
    http_exc.value.close()
    inputs = small.data_dir / "files" / "inputs"
    assert not inputs.exists() or list(inputs.iterdir()) == []
    assert c.files.list().data == []


def test_one_20mb_line(c: OpenAI) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "z" * 20_000_000}]}
    data = jsonl(line("huge", body=body))
    file = c.files.create(file=("huge.jsonl", data), purpose="batch")
    assert c.files.wait_for_processing(file.id, poll_interval=0.1).status == "processed"
    batch = c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_batch(c, batch.id, timeout=60)
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.completed == 1


# -- uploads ----------------------------------------------------------------------------------
def test_upload_checks(c: OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.create(file=("in.txt", chat_lines(1)), purpose="batch")
    assert exc.value.param == "file"
    with pytest.raises(openai.BadRequestError) as exc:
        c.files.create(file=("in.jsonl", chat_lines(1)), purpose="bogus")  # type: ignore[arg-type]
    assert exc.value.param == "purpose"
    f = c.files.create(file=("../../etc/passwd.jsonl", chat_lines(1)), purpose="batch")
    assert f.filename == "passwd.jsonl"
    assert not (server.data_dir.parent / "etc").exists()
    other = c.files.create(file=("notes.jsonl", chat_lines(1)), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as exc:
        c.batches.create(
            input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert exc.value.param == "input_file_id"
    status, headers, body = raw(
        server, "POST", "/v1/files", b"{}", {"Content-Type": "application/json"}
    )
    assert assert_envelope(status, headers, body, 400)["code"] == "invalid_content_type"
    status, headers, body = raw(
        server,
        "POST",
        "/v1/files",
        b"--x\r\nbroken",
        {"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert_envelope(status, headers, body, 400)


# -- batch parameters --------------------------------------------------------------------------
@pytest.fixture
def good_file(c: OpenAI) -> str:
    f = c.files.create(file=("ok.jsonl", chat_lines(1)), purpose="batch")
    return f.id


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"endpoint": "/v1/images/generations"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 64),
    ],
    ids=["endpoint", "window", "metadata-keys", "metadata-value", "metadata-key"],
)
def test_bad_batch_parameters(
    c: OpenAI, good_file: str, kwargs: dict[str, Any], param: str
) -> None:
    args: dict[str, Any] = {
        "input_file_id": good_file,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        **kwargs,
    }
    with pytest.raises(openai.BadRequestError) as exc:
        c.batches.create(**args)
    assert exc.value.param == param


def test_missing_and_foreign_input_file(
    c: OpenAI, server: Server, sdk: Callable[..., OpenAI]
) -> None:
    b = sdk(server, OTHER_KEY)
    foreign = b.files.create(file=("b.jsonl", chat_lines(1)), purpose="batch")
    for file_id in ("file-does-not-exist", foreign.id):
        with pytest.raises(openai.NotFoundError) as exc:
            c.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert exc.value.param == "input_file_id"


def test_bodies_and_queries(server: Server) -> None:
    cases: list[tuple[str, str, bytes | None, dict[str, str], int]] = [
        ("POST", "/v1/batches", b"not json", {"Content-Type": "application/json"}, 400),
        ("POST", "/v1/batches", b"[1]", {"Content-Type": "application/json"}, 400),
        ("POST", "/v1/batches", b'{"a": 1}', {"Content-Type": "text/plain"}, 400),
        ("POST", "/v1/batches", b"{}", {"Content-Type": "application/json"}, 400),
        ("GET", "/v1/batches?limit=0", None, {}, 400),
        ("GET", "/v1/batches?limit=1000", None, {}, 400),
        ("GET", "/v1/batches?limit=abc", None, {}, 400),
        ("GET", "/v1/batches?after=garbage", None, {}, 400),
        ("GET", "/v1/files?order=sideways", None, {}, 400),
        ("GET", "/v1/batches/batch_nope", None, {}, 404),
        ("POST", "/v1/batches/batch_nope/cancel", None, {}, 404),
        ("GET", "/v1/files/file-nope/content", None, {}, 404),
        ("DELETE", "/v1/files/file-nope", None, {}, 404),
        ("GET", "/v1/nothing-here", None, {}, 404),
        ("GET", "/openai/batches?api-version=2024-07-01-preview&limit=0", None, {}, 400),
    ]
    for method, path, body, headers, want in cases:
        status, h, payload = raw(server, method, path, body, headers)
        assert_envelope(status, h, payload, want)
    # No key at all: 401 in the same shape.
    req = urllib.request.Request(server.url + "/v1/files")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req)
    with exc.value as err:
        assert err.code == 401
        assert json.loads(err.read())["error"]["type"] == "authentication_error"
    # After all of it, the server still answers.
    with urllib.request.urlopen(server.url + "/healthz") as resp:
        assert resp.status == 200


def test_review_cases_all_listed(c: OpenAI) -> None:
    """A wrong url beside an invalid JSON line; a model of the wrong type; stream: 0."""
    rows = [
        json.dumps(line(cid="ok")).encode(),
        json.dumps(line(cid="emb", url="/v1/embeddings")).encode(),
        b"{bad",
        json.dumps(line(cid="m5", body={"model": 5, "messages": []})).encode(),
        json.dumps(line(cid="s0", body={"model": "gpt-4o", "messages": [], "stream": 0})).encode(),
    ]
    file, batch = create_failed(c, b"\n".join(rows) + b"\n")
    assert codes(batch) == [
        ("url_mismatch", 2, "url"),
        ("invalid_json_line", 3, None),
        ("invalid_request", 4, "body.model"),
        ("streaming_unsupported", 5, "body.stream"),
    ]
    # the file's own problems (the url is checked against the batch's endpoint)
    assert file.status_details is not None
    assert file.status_details.endswith("(3 problems, on lines 3, 4, 5)")


def test_a_processed_file_names_its_problems(c: OpenAI) -> None:
    rows = [json.dumps(line(cid="a")).encode(), json.dumps(line(cid="a")).encode()]
    file = c.files.create(file=("dup.jsonl", b"\n".join(rows) + b"\n"), purpose="batch")
    file = c.files.wait_for_processing(file.id, poll_interval=0.1)
    assert file.status == "processed"
    assert file.status_details == "Line 2: custom_id 'a' is used more than once."
