"""Every hostile request gets a clear 4xx in OpenAI's error shape: never a 5xx, a stall, a
leak or a partial file (issue 10). Raw HTTP against a real ``batchd serve``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.conftest import API_KEY, OTHER_KEY, base_config
from tests.contract.hostile import (
    BOUNDARY,
    FORM_TYPE,
    Answer,
    connect,
    form,
    head_bytes,
    post_form,
    read_answer,
    request,
)
from tests.support import Server, Upstream, chat_lines


def stored_inputs(server: Server) -> list[Path]:
    inputs = server.data_dir / "files" / "inputs"
    return sorted(p for p in inputs.iterdir()) if inputs.exists() else []


@pytest.fixture
def nothing_left(server: Server, client: OpenAI) -> Callable[[], None]:
    """A check that a refused upload left no file listed and no blob stored."""
    listed = {f.id for f in client.files.list()}
    blobs = stored_inputs(server)

    def check() -> None:
        assert {f.id for f in client.files.list()} == listed
        assert stored_inputs(server) == blobs
        assert not [p for p in (server.data_dir / "files" / "inputs").glob(".*.tmp")]

    return check


# -- uploads: all or nothing -----------------------------------------------------------------------
def test_upload_cut_before_closing_boundary(
    server: Server, nothing_left: Callable[[], None]
) -> None:
    body = form({"purpose": "batch"}, ("in.jsonl", chat_lines(50)))
    cut = body[: body.rindex(b"\r\n--")]  # every line there, but no closing boundary
    answer = post_form(server.url, cut)
    assert answer.status == 400
    assert answer.error["code"] == "incomplete_body"
    assert answer.headers["x-should-retry"] == "false"
    nothing_left()
    # Cut in the middle of a line too.
    answer = post_form(server.url, body[: len(body) // 2])
    assert (answer.status, answer.error["code"]) == (400, "incomplete_body")
    nothing_left()


def test_content_length_shorter_than_body(server: Server, nothing_left: Callable[[], None]) -> None:
    body = form({"purpose": "batch"}, ("in.jsonl", chat_lines(20)))
    short = len(body) - 40
    head = head_bytes(
        "POST", "/v1/files", {"Content-Type": FORM_TYPE, "Content-Length": str(short)}
    )
    with connect(server.url) as sock:
        sock.sendall(head + body[:short])  # the form as far as the length says; no more yet
        answer = read_answer(sock, "POST")
    assert (answer.status, answer.error["code"]) == (400, "incomplete_body")
    nothing_left()
    # Sent at once, the bytes past the length are a broken next request: 400 too.
    with connect(server.url) as sock:
        sock.sendall(head + body)
        answer = read_answer(sock, "POST")
    assert answer.status == 400
    time.sleep(0.3)
    nothing_left()


def test_content_length_longer_than_body(server: Server, nothing_left: Callable[[], None]) -> None:
    """The client sends less than it announced and goes away: nothing is kept."""
    body = form({"purpose": "batch"}, ("in.jsonl", chat_lines(20)))
    head = head_bytes(
        "POST", "/v1/files", {"Content-Type": FORM_TYPE, "Content-Length": str(len(body) + 500)}
    )
    with connect(server.url) as sock:
        sock.sendall(head + body)
    time.sleep(0.5)
    nothing_left()
    assert request(server.url, "GET", "/healthz", key=None).status == 200
    assert "unhandled error" not in server.proc.output()


def test_form_caps(server: Server, nothing_left: Callable[[], None]) -> None:
    many = form({f"f{i}": "v" for i in range(300_000)})  # 300,000 fields, no file: ~20 MB
    answer = post_form(server.url, many)
    assert (answer.status, answer.error["code"]) == (400, "too_many_form_fields")
    assert answer.headers["connection"] == "close"
    big_field = form({"purpose": "x" * (1024 * 1024)}, ("in.jsonl", chat_lines(1)))
    answer = post_form(server.url, big_field)
    assert (answer.status, answer.error["param"]) == (400, "purpose")
    assert len(answer.error["message"]) < 200
    long_header = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n'
        f"X-Pad: {'p' * 100_000}\r\n\r\nbatch\r\n--{BOUNDARY}--\r\n"
    ).encode()
    assert post_form(server.url, long_header).status == 400
    nothing_left()
    assert request(server.url, "GET", "/healthz", key=None).status == 200


def test_upload_other_refusals(server: Server, nothing_left: Callable[[], None]) -> None:
    cases = [
        ({"Content-Type": "multipart/form-data"}, form({"purpose": "batch"})),  # no boundary
        ({"Content-Type": "multipart/form-data; boundary=" + "b" * 71}, b"--x--\r\n"),
        ({"Content-Type": "text/plain"}, b"hello"),
        ({}, b""),  # no body at all
    ]
    for headers, body in cases:
        answer = request(server.url, "POST", "/v1/files", body, headers)
        assert answer.status == 400, (headers, answer.body)
        assert answer.error["type"] == "invalid_request_error"
    nothing_left()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "²"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "9" * 5000}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "٣٦٠٠"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "-3600"}, "seconds"),
        ({"expires_after.anchor": "created_at", "expires_after.seconds": "3600.5"}, "seconds"),
        ({"expires_after[anchor]": "now", "expires_after[seconds]": "3600"}, "anchor"),
    ],
    ids=["superscript", "5000-digits", "arabic-indic", "negative", "fraction", "anchor"],
)
def test_expires_after_is_ascii_and_bounded(
    server: Server, nothing_left: Callable[[], None], fields: dict[str, str], param: str
) -> None:
    answer = post_form(server.url, form({"purpose": "batch", **fields}, ("a.jsonl", b"{}\n")))
    assert answer.status == 400
    assert answer.error["param"] == f"expires_after[{param}]"
    assert len(answer.error["message"]) < 200
    nothing_left()


def test_expires_after_out_of_range_and_accepted(client: OpenAI, server: Server) -> None:
    fields = {"expires_after[anchor]": "created_at", "expires_after[seconds]": "99999999"}
    answer = post_form(server.url, form({"purpose": "batch", **fields}, ("a.jsonl", b"{}\n")))
    assert answer.status == 400 and answer.error["param"] == "expires_after"
    fields["expires_after[seconds]"] = "7200"
    answer = post_form(server.url, form({"purpose": "batch", **fields}, ("a.jsonl", b"{}\n")))
    assert answer.status == 200
    rec = answer.json()
    assert rec["expires_at"] == rec["created_at"] + 7200


def test_filename_over_255_characters_keeps_its_extension(client: OpenAI) -> None:
    name = "n" * 300 + ".jsonl"
    f = client.files.create(file=(name, chat_lines(1)), purpose="batch")
    assert f.status == "processed"
    assert len(f.filename) == 255 and f.filename.endswith(".jsonl")
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("n" * 300 + ".txt", chat_lines(1)), purpose="batch")
    assert exc.value.param == "file"


# -- errors echo a short prefix at most ------------------------------------------------------------
def test_echoed_values_are_cut(client: OpenAI, server: Server) -> None:
    purpose = "p" * 10_000
    answer = post_form(server.url, form({"purpose": purpose}, ("a.jsonl", b"{}\n")))
    assert (answer.status, answer.error["param"]) == (400, "purpose")
    assert len(answer.error["message"]) < 200
    good = client.files.create(file=("ok.jsonl", chat_lines(1)), purpose="batch")
    for field, value in [
        ("endpoint", "/v1/" + "e" * 1_000_000),
        ("completion_window", "w" * 100_000),
        ("input_file_id", "file-" + "i" * 100_000),
    ]:
        body = {"input_file_id": good.id, "endpoint": "/v1/chat/completions"}
        body |= {"completion_window": "24h", field: value}
        answer = request(
            server.url,
            "POST",
            "/v1/batches",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        assert answer.status in (400, 404, 413), answer.body[:200]
        assert len(answer.body) < 1500, field
    answer = request(server.url, "GET", "/v1/files/file-" + "x" * 6000)
    assert answer.status == 404 and len(answer.error["message"]) < 200


# -- POST /batches bodies --------------------------------------------------------------------------
def create(server: Server, body: bytes, content_type: str = "application/json") -> Answer:
    return request(server.url, "POST", "/v1/batches", body, {"Content-Type": content_type})


def test_batch_create_strict_content_type(server: Server, client: OpenAI) -> None:
    good = client.files.create(file=("ok.jsonl", chat_lines(1)), purpose="batch")
    body = json.dumps(
        {"input_file_id": good.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    ).encode()
    for ctype in ("text/json", "application/jsonl", "application/json-seq", "text/plain; json"):
        answer = create(server, body, ctype)
        assert answer.status == 400, ctype
        assert answer.error["code"] == "invalid_content_type"
    answer = create(server, body, "application/json; charset=utf-8")
    assert answer.status == 200
    client.batches.cancel(answer.json()["id"])


def test_batch_create_nesting(server: Server) -> None:
    for depth in (1_000, 100_000):
        nested = b"[" * depth + b"]" * depth
        for body in (
            b'{"ignored": ' + nested + b"}",
            b'{"metadata": {"k": ' + nested + b"}}",
            nested,
        ):
            answer = create(server, body)
            assert answer.status in (400, 413), answer.body[:200]
            assert answer.error["type"] == "invalid_request_error"
    answer = create(server, b'{"ignored": ' + b"[" * 1000 + b"]" * 1000 + b"}")
    assert answer.error["code"] == "invalid_json"


def test_batch_create_body_size(server: Server) -> None:
    # 300 MB announced: refused before any of it is read, and the connection closed.
    head = head_bytes(
        "POST",
        "/v1/batches",
        {"Content-Type": "application/json", "Content-Length": str(300 * 1024 * 1024)},
    )
    with connect(server.url) as sock:
        sock.sendall(head + b'{"input_file_id": "')
        answer = read_answer(sock, "POST")
    assert (answer.status, answer.error["code"]) == (413, "body_too_large")
    assert answer.headers["connection"] == "close"
    # Chunked, no length: refused once past the limit.
    with connect(server.url) as sock:
        sock.sendall(
            head_bytes(
                "POST",
                "/v1/batches",
                {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            )
        )
        chunk = b" " * 65536
        try:
            for _ in range(64):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_answer(sock, "POST")
    assert (answer.status, answer.error["code"]) == (413, "body_too_large")


def test_batch_create_bounded_integers(server: Server, client: OpenAI) -> None:
    good = client.files.create(file=("ok.jsonl", chat_lines(1)), purpose="batch")
    base = {
        "input_file_id": good.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    for seconds in (b"1" + b"0" * 5000, b"1e400", b"3600.0", b"true", b"-3600", b"99999999999"):
        body = json.dumps(base).encode()[:-1] + (
            b', "output_expires_after": {"anchor": "created_at", "seconds": ' + seconds + b"}}"
        )
        answer = create(server, body)
        assert answer.status == 400, (seconds[:20], answer.body[:200])
        assert answer.error["param"] in ("output_expires_after", None)
    assert all(b.input_file_id != good.id for b in client.batches.list().data)


# -- Range (RFC 9110) ------------------------------------------------------------------------------
DATA = b"0123456789abcdefghij\n"  # 21 bytes


@pytest.fixture
def stored(client: OpenAI) -> str:
    return client.files.create(file=("r.bin", DATA), purpose="user_data").id


@pytest.mark.parametrize(
    ("range_", "status", "content"),
    [
        ("bytes=0-4", 206, DATA[:5]),
        ("bytes=5-", 206, DATA[5:]),
        ("bytes=-3", 206, DATA[-3:]),
        ("bytes=5-2", 200, DATA),  # invalid: ignored
        ("bytes=0-" + "9" * 4400, 206, DATA),  # last position past the end: cut to it
        ("bytes=-" + "9" * 4400, 206, DATA),
        ("BYTES=2-3", 206, DATA[2:4]),
        ("bytes=0-1,4-5", 200, DATA),  # several ranges: the whole file
        ("items=0-4", 200, DATA),  # another unit: ignored
        ("bytes=\u0663-".encode().decode("latin-1"), 200, DATA),  # UTF-8 of a digit: ignored
        ("bytes=abc", 200, DATA),
        ("bytes=", 200, DATA),
    ],
)
def test_range(server: Server, stored: str, range_: str, status: int, content: bytes) -> None:
    answer = request(server.url, "GET", f"/v1/files/{stored}/content", headers={"Range": range_})
    assert (answer.status, answer.body) == (status, content)
    assert int(answer.headers["content-length"]) == len(content)
    if status == 206:
        start = DATA.index(content) if content != DATA else 0
        assert answer.headers["content-range"] == f"bytes {start}-{start + len(content) - 1}/21"


@pytest.mark.parametrize(
    "range_", ["bytes=21-", "bytes=" + "9" * 4400 + "-", "bytes=-0", "bytes=30-40,50-"]
)
def test_range_not_satisfiable(server: Server, stored: str, range_: str) -> None:
    answer = request(server.url, "GET", f"/v1/files/{stored}/content", headers={"Range": range_})
    assert answer.status == 416
    assert answer.error["code"] == "range_not_satisfiable"
    assert answer.headers["content-range"] == "bytes */21"


# -- methods ---------------------------------------------------------------------------------------
def test_head_where_get_is(server: Server, client: OpenAI, stored: str) -> None:
    answer = request(server.url, "HEAD", f"/v1/files/{stored}/content")
    assert (answer.status, answer.body) == (200, b"")
    assert answer.headers["content-length"] == "21"
    answer = request(
        server.url, "HEAD", f"/v1/files/{stored}/content", headers={"Range": "bytes=1-2"}
    )
    assert (answer.status, answer.headers["content-range"]) == (206, "bytes 1-2/21")
    for path in ("/v1/files", f"/v1/files/{stored}", "/v1/batches", "/openai/files", "/healthz"):
        answer = request(server.url, "HEAD", path)
        assert (answer.status, answer.body) == (200, b""), path
        assert int(answer.headers["content-length"]) > 0
    assert request(server.url, "HEAD", "/v1/files/file-nope/content").status == 404
    assert request(server.url, "HEAD", "/v1/files", key=None).status == 401


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/files", "GET, HEAD, POST"),
        ("PATCH", "/v1/files/file-x", "DELETE, GET, HEAD"),
        ("POST", "/v1/files/file-x/content", "GET, HEAD"),
        ("DELETE", "/v1/batches", "GET, HEAD, POST"),
        ("GET", "/v1/batches/batch_x/cancel", "POST"),
    ],
)
def test_allow_names_every_method(server: Server, method: str, path: str, allow: str) -> None:
    answer = request(server.url, method, path)
    assert answer.status == 405
    assert answer.headers["allow"] == allow
    assert answer.error["code"] == "method_not_allowed"


# -- auth ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bearer", "api_key", "status"),
    [
        ("sk-wrong", API_KEY, 200),
        (API_KEY, "sk-wrong", 200),
        (API_KEY, API_KEY, 200),
        ("sk-wrong", "sk-also-wrong", 401),
        (API_KEY, OTHER_KEY, 401),  # two projects: refused rather than guessed
    ],
)
def test_both_auth_headers(server: Server, bearer: str, api_key: str, status: int) -> None:
    answer = request(
        server.url,
        "GET",
        "/v1/files",
        headers={"Authorization": f"Bearer {bearer}", "api-key": api_key},
        key=None,
    )
    assert answer.status == status, answer.body
    if status == 401:
        assert answer.error["type"] == "authentication_error"


# -- the OpenAPI document --------------------------------------------------------------------------
def test_openapi_lists_every_status(server: Server) -> None:
    doc = request(server.url, "GET", "/openapi.json", key=None).json()
    assert "422" not in json.dumps(doc["paths"]) and "HTTPValidationError" not in json.dumps(doc)
    error_ref = {"$ref": "#/components/schemas/Error"}
    want = {
        ("post", "/v1/files"): {"200", "400", "401", "408", "409", "413"},
        ("get", "/v1/files"): {"200", "400", "401"},
        ("get", "/v1/files/{file_id}"): {"200", "401", "404"},
        ("delete", "/v1/files/{file_id}"): {"200", "401", "404"},
        ("get", "/v1/files/{file_id}/content"): {"200", "206", "401", "404", "416"},
        ("post", "/v1/batches"): {"200", "400", "401", "404", "408", "409", "413"},
        ("get", "/v1/batches"): {"200", "400", "401"},
        ("get", "/v1/batches/{batch_id}"): {"200", "401", "404"},
        ("post", "/v1/batches/{batch_id}/cancel"): {"200", "401", "404", "409"},
        ("get", "/v1/usage"): {"200", "401"},
    }
    for (method, path), statuses in want.items():
        op = doc["paths"][path][method]
        assert set(op["responses"]) == statuses, (method, path)
        for status, resp in op["responses"].items():
            if status.startswith("4"):
                assert resp["content"]["application/json"]["schema"] == error_ref
        assert "head" in doc["paths"][path] or method != "get"
    params = {p["name"]: p["schema"] for p in doc["paths"]["/v1/batches"]["get"]["parameters"]}
    assert (params["limit"]["minimum"], params["limit"]["maximum"]) == (1, 100)
    assert any("pattern" in alt for alt in params["after"]["anyOf"])
    files = {p["name"]: p["schema"] for p in doc["paths"]["/v1/files"]["get"]["parameters"]}
    assert files["order"]["enum"] == ["asc", "desc"]
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "api-key"}


# -- a body that stops arriving --------------------------------------------------------------------
@pytest.fixture
def impatient(make_server: Callable[..., Server], upstream: Upstream) -> Server:
    return make_server(base_config(upstream, limits={"body_timeout_seconds": 1.0}))


@pytest.mark.parametrize("path", ["/v1/files", "/v1/batches"])
def test_stalled_body_times_out(impatient: Server, sdk: Callable[..., OpenAI], path: str) -> None:
    body = form({"purpose": "batch"}, ("in.jsonl", chat_lines(100)))
    ctype = FORM_TYPE if path == "/v1/files" else "application/json"
    head = head_bytes("POST", path, {"Content-Type": ctype, "Content-Length": str(len(body))})
    started = time.monotonic()
    with connect(impatient.url, timeout=20) as sock:
        sock.sendall(head + body[: len(body) // 2])  # then nothing more
        answer = read_answer(sock, "POST")
        assert sock.recv(1) == b""  # and the server closed the connection
    assert time.monotonic() - started < 15
    assert (answer.status, answer.error["code"]) == (408, "body_timeout")
    assert answer.headers["connection"] == "close"
    assert sdk(impatient).files.list().data == []
    assert stored_inputs(impatient) == []
    assert not list((impatient.data_dir / "files").rglob("*.tmp"))


def test_slow_but_steady_upload_is_fine(impatient: Server, sdk: Callable[..., OpenAI]) -> None:
    """The timeout is between pieces of the body, not over the whole of it."""
    body = form({"purpose": "batch"}, ("in.jsonl", chat_lines(30)))
    head = head_bytes(
        "POST", "/v1/files", {"Content-Type": FORM_TYPE, "Content-Length": str(len(body))}
    )
    with connect(impatient.url, timeout=20) as sock:
        sock.sendall(head)
        step = len(body) // 4 + 1
        for i in range(0, len(body), step):
            time.sleep(0.6)
            sock.sendall(body[i : i + step])
        answer = read_answer(sock, "POST")
    assert answer.status == 200, answer.body
    assert answer.json()["status"] == "processed"


# -- the server stays healthy throughout -----------------------------------------------------------
def test_no_5xx_was_logged(server: Server) -> None:
    """Runs last in this module: nothing above made the server log an unhandled error."""
    assert "unhandled error" not in server.proc.output()
    assert "Traceback" not in server.proc.output()


def _raw_exchange(server: Server, request: bytes, send_all: bool = True) -> tuple[bytes, float]:
    """Send raw bytes (stopping at the first error if the server closes), read the answer."""
    import socket
    import urllib.parse

    url = urllib.parse.urlsplit(server.url)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        try:
            for i in range(0, len(request), 65536):
                sock.sendall(request[i : i + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while data := sock.recv(65536):
                chunks.append(data)
        except ConnectionResetError:
            pass
    return b"".join(chunks), time.monotonic() - started


def test_request_heads_are_bounded(server: Server) -> None:
    """A 20 MiB header is refused with 431 in OpenAI's shape as it arrives (no quadratic
    parse, no blocked loop); a malformed request gets a JSON 400, not plain text."""
    big = b"GET /v1/files HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 << 20) + b"\r\n\r\n"
    answer, seconds = _raw_exchange(server, big)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), head[:100]
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    assert seconds < 5
    many = b"GET /v1/files HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n"
    assert _raw_exchange(server, many)[0].startswith(b"HTTP/1.1 431 ")
    bad = (
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
    )
    answer, _ = _raw_exchange(server, bad)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    # the server still answers
    ok, _ = _raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ")


def test_without_auth_web_pages_and_rebound_names_are_refused(
    make_server: Callable[..., Server], upstream: Upstream
) -> None:
    import urllib.error
    import urllib.request

    cfg = base_config(upstream)
    del cfg["auth"]
    server = make_server(cfg)

    def call(method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
        req = urllib.request.Request(server.url + path, method=method, headers=headers)
        if method == "POST":
            req.data = b"{}"
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    status, body = call("GET", "/v1/files", {"Host": "attacker.example:8000"})
    assert (status, body["error"]["code"]) == (403, "host_not_allowed")  # type: ignore[index]
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
        status, body = call("POST", "/v1/batches", headers)
        assert (status, body["error"]["code"]) == (403, "cross_site_request")  # type: ignore[index]
    assert call("GET", "/v1/files", {})[0] == 200  # the SDKs and curl send neither header
    assert call("GET", "/v1/files", {"Host": "localhost:1"})[0] == 200
    same = {"Sec-Fetch-Site": "same-origin", "Origin": server.url}
    assert call("POST", "/v1/batches", same)[0] == 400  # reached the API (a bad body)
