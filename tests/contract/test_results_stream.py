"""Results while a batch runs (``GET .../batches/{id}/results``, an extension; docs/results.md)
against a real ``batchd serve`` and the fake upstream: the results committed so far in the
middle of a batch, the cursor, the outcome filter, ``follow`` to the batch's end (a cancel's
never-executed requests included) and across a ``kill -9`` of a worker and of the server,
keep-alive spaces and disconnects, the errors, and ``batchd results --follow``."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from openai import OpenAI

from tests.conftest import API_KEY, OTHER_KEY, base_config
from tests.contract.test_observability import m, wait_metrics
from tests.support import (
    BATCHD,
    Server,
    Upstream,
    chat_lines,
    read_jsonl,
    start_server,
    start_worker,
    wait_batch,
)

TERMINAL = ("completed", "failed", "expired", "cancelled")
TREES = ("/v1", "/openai/v1", "/openai")


def _submit(c: OpenAI, n: int, prefix: str = "req") -> str:
    file = c.files.create(file=("in.jsonl", chat_lines(n, prefix=prefix)), purpose="batch")
    return c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def _url(server: Server, batch_id: str, tree: str = "/v1") -> str:
    return f"{server.url}{tree}/batches/{batch_id}/results"


def _params(tree: str, **params: Any) -> dict[str, Any]:
    if tree == "/openai":
        params["api-version"] = "2024-07-01-preview"
    return {k: v for k, v in params.items() if v is not None}


def _get(
    server: Server, batch_id: str, *, tree: str = "/v1", key: str = API_KEY, **params: Any
) -> httpx2.Response:
    return httpx2.get(
        _url(server, batch_id, tree),
        params=_params(tree, **params),
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def _lines(server: Server, batch_id: str, **params: Any) -> list[dict[str, Any]]:
    resp = _get(server, batch_id, **params)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/x-ndjson"
    return read_jsonl(resp.text)


def _position(batch_id: str, line: dict[str, Any]) -> int:
    head = "batch_req_" + batch_id.removeprefix("batch_") + "_"
    assert line["id"].startswith(head), line["id"]
    return int(line["id"][len(head) :])


class Follower:
    """A followed stream read on a thread: each line (parsed) as it arrives, the raw bytes,
    and whether the stream ended."""

    def __init__(
        self, server: Server, batch_id: str, key: str = API_KEY, **params: Any
    ) -> None:
        self.key = key
        self.lines: list[dict[str, Any]] = []
        self.raw = bytearray()
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.batch_status_at_end: str | None = None
        self._args = (server, batch_id, params)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        server, batch_id, params = self._args
        try:
            with httpx2.stream(
                "GET",
                _url(server, batch_id),
                params={"follow": "true", **params},
                headers={"Authorization": f"Bearer {self.key}"},
                timeout=120,
            ) as resp:
                assert resp.status_code == 200
                pending = b""
                for chunk in resp.iter_bytes():
                    self.raw += chunk
                    *whole, pending = (pending + chunk).split(b"\n")
                    self.lines.extend(json.loads(line) for line in whole)
            with OpenAI(base_url=server.url + "/v1", api_key=self.key) as c:
                self.batch_status_at_end = c.batches.retrieve(batch_id).status
        except BaseException as exc:  # reported by wait()
            self.error = exc
        finally:
            self.ended.set()

    def wait(self, timeout: float = 120) -> list[dict[str, Any]]:
        assert self.ended.wait(timeout), "the followed stream did not end"
        if self.error is not None:
            raise self.error
        return self.lines


def _wait_done(c: OpenAI, batch_id: str, at_least: int, timeout: float = 60) -> Any:
    deadline = time.time() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        if b.request_counts and b.request_counts.completed + b.request_counts.failed >= at_least:
            return b
        assert time.time() < deadline, f"no progress on {batch_id}: {b.request_counts}"
        time.sleep(0.05)


def _files(c: OpenAI, batch: Any) -> list[dict[str, Any]]:
    out = read_jsonl(c.files.content(batch.output_file_id).text) if batch.output_file_id else []
    err = read_jsonl(c.files.content(batch.error_file_id).text) if batch.error_file_id else []
    return out + err


def _exactly_once(lines: list[dict[str, Any]], batch_id: str, n: int, prefix: str = "req") -> None:
    """Every custom_id once, at positions 0..n-1 in order."""
    ids = [r["custom_id"] for r in lines]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    assert sorted(ids) == sorted(f"{prefix}-{i}" for i in range(n))
    assert [_position(batch_id, r) for r in lines] == list(range(n))


def test_results_while_running_and_the_cursor(
    client: OpenAI, server: Server, upstream: Upstream
) -> None:
    upstream.control(latency=0.3)  # 32 in flight: ~100 requests/s, 6 s for 600
    n = 600
    batch_id = _submit(client, n)
    _wait_done(client, batch_id, 60)
    so_far = _lines(server, batch_id)
    assert client.batches.retrieve(batch_id).status == "in_progress"
    k = len(so_far)
    assert 60 <= k < n
    assert [_position(batch_id, r) for r in so_far] == list(range(k))
    assert len({r["custom_id"] for r in so_far}) == k
    for r in so_far:
        assert r["response"]["status_code"] == 200 and r["error"] is None
        answer = r["response"]["body"]["choices"][0]["message"]["content"]
        assert answer == "echo: " + r["custom_id"]
    # The cursor: after line j, exactly the lines after it (at least those read already).
    j = k // 2
    rest = _lines(server, batch_id, after=so_far[j]["id"])
    assert rest[: k - j - 1] == so_far[j + 1 :]
    assert [_position(batch_id, r) for r in rest] == list(range(j + 1, j + 1 + len(rest)))

    batch = wait_batch(client, batch_id, timeout=60)
    assert batch.status == "completed"
    whole = _lines(server, batch_id)
    _exactly_once(whole, batch_id, n)
    assert whole[:k] == so_far  # the same lines, the same ids, in the same order
    # The output file has the very same lines (ids included), in the same order.
    assert _files(client, batch) == whole
    # The same on Azure's trees.
    for tree in TREES[1:]:
        assert _lines(server, batch_id, tree=tree, after=whole[-3]["id"]) == whole[-2:]
    assert _lines(server, batch_id, after=whole[-1]["id"]) == []


def test_outcome_filter(client: OpenAI, server: Server, upstream: Upstream) -> None:
    upstream.control(reject_content="req-1")  # req-1 and req-10..req-19: a final 400
    n = 20
    batch_id = _submit(client, n)
    batch = wait_batch(client, batch_id)
    assert batch.request_counts is not None and batch.request_counts.failed == 11
    good = _lines(server, batch_id, outcome="succeeded")
    bad = _lines(server, batch_id, outcome="failed")
    assert {r["custom_id"] for r in good} == {"req-0", *(f"req-{i}" for i in range(2, 10))}
    assert all(r["response"]["status_code"] == 200 for r in good)
    assert {r["custom_id"] for r in bad} == {"req-1", *(f"req-{i}" for i in range(10, 20))}
    assert all(r["response"]["status_code"] == 400 for r in bad)
    everything = _lines(server, batch_id)
    assert sorted(good + bad, key=lambda r: _position(batch_id, r)) == everything
    # The filter and the cursor together; follow on an ended batch ends at once.
    third = everything[2]["id"]
    assert _lines(server, batch_id, outcome="failed", after=third) == [
        r for r in everything[3:] if r["response"]["status_code"] == 400
    ]
    assert _lines(server, batch_id, follow="true", outcome="succeeded") == good
    # The output and error files hold the same lines.
    out = read_jsonl(client.files.content(batch.output_file_id).text)
    err = read_jsonl(client.files.content(batch.error_file_id).text)
    assert (out, err) == (good, bad)


def test_follow_ends_at_the_end_with_every_result_once(
    client: OpenAI, server: Server, upstream: Upstream
) -> None:
    upstream.control(latency=0.05)
    n = 300
    batch_id = _submit(client, n)
    follower = Follower(server, batch_id)
    lines = follower.wait()
    assert follower.batch_status_at_end == "completed"
    _exactly_once(lines, batch_id, n)
    assert lines == _files(client, client.batches.retrieve(batch_id))


def test_follow_a_cancelled_batch_includes_the_never_executed(
    client: OpenAI, server: Server, upstream: Upstream
) -> None:
    upstream.control(latency=0.2)
    n = 400
    batch_id = _submit(client, n)
    follower = Follower(server, batch_id)
    _wait_done(client, batch_id, 40)
    client.batches.cancel(batch_id)
    lines = follower.wait()
    assert follower.batch_status_at_end == "cancelled"
    _exactly_once(lines, batch_id, n)
    never = [r for r in lines if r["response"] is None]
    assert never and {r["error"]["code"] for r in never} == {"batch_cancelled"}
    # The never-executed come last, after every executed one.
    assert lines[-len(never) :] == never
    assert lines == _files(client, client.batches.retrieve(batch_id))


def _error(resp: httpx2.Response, status: int, param: str | None, code: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    assert err["type"] == "invalid_request_error" and err["message"]
    assert resp.headers["x-should-retry"] == "false"


def test_bad_parameters_and_other_projects(
    client: OpenAI, server: Server, upstream: Upstream
) -> None:
    first, second = _submit(client, 2, "a"), _submit(client, 2, "b")
    wait_batch(client, first)
    wait_batch(client, second)
    other_line = _lines(server, second)[0]["id"]
    ok_line = _lines(server, first)[0]["id"]
    for tree in TREES:
        bad = {
            "not-an-id": ("after", "invalid_value"),
            other_line: ("after", "invalid_value"),  # a line of another batch
            ok_line + "0" * 200: ("after", "invalid_value"),  # too long
            ok_line.rsplit("_", 1)[0] + "_-1": ("after", "invalid_value"),
            # past any position a store integer holds (it must not reach the store)
            ok_line.rsplit("_", 1)[0] + "_9223372036854775807": ("after", "invalid_value"),
            ok_line.rsplit("_", 1)[0] + "_" + "9" * 60: ("after", "invalid_value"),
            # past the batch's last request (it has 2): a typo'd cursor would show nothing
            ok_line.rsplit("_", 1)[0] + "_2": ("after", "invalid_value"),
        }
        for after, (param, code) in bad.items():
            _error(_get(server, first, tree=tree, after=after), 400, param, code)
        _error(_get(server, first, tree=tree, outcome="cancelled"), 400, "outcome", "invalid_value")
        _error(_get(server, first, tree=tree, follow="maybe"), 400, "follow", "invalid_value")
        # Another project's batch is not found, as an unknown one.
        _error(_get(server, first, tree=tree, key=OTHER_KEY), 404, "batch_id", "batch_not_found")
        _error(_get(server, "batch_nope", tree=tree), 404, "batch_id", "batch_not_found")
        assert _get(server, first, tree=tree, key="sk-wrong").status_code == 401
        # A missing key names the headers this tree takes (x-api-key is Anthropic's).
        missing = httpx2.get(_url(server, first, tree), params=_params(tree))
        assert missing.status_code == 401
        assert missing.json()["error"]["message"] == (
            "Missing API key: send it as 'Authorization: Bearer KEY' or 'api-key: KEY'."
        )
        # Azure's key header is accepted too.
        resp = httpx2.get(
            _url(server, first, tree), params=_params(tree), headers={"api-key": API_KEY}
        )
        assert len(read_jsonl(resp.text)) == 2
    head = httpx2.head(_url(server, first), headers={"Authorization": f"Bearer {API_KEY}"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "application/x-ndjson"
    head = httpx2.head(_url(server, first), headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert head.status_code == 404


def test_the_openapi_document_lists_the_route(server: Server) -> None:
    doc = httpx2.get(server.url + "/openapi.json").json()
    for tree in TREES:
        op = doc["paths"][f"{tree}/batches/{{batch_id}}/results"]["get"]
        assert set(op["responses"]) == {"200", "400", "401", "404"}
        assert "application/x-ndjson" in op["responses"]["200"]["content"]
        assert "extension" in op["description"]
        names = {p["name"] for p in op["parameters"]}
        assert {"batch_id", "after", "outcome", "follow"} <= names


@pytest.fixture
def slow_server(
    make_server: Callable[..., Server], upstream: Upstream
) -> Iterator[Server]:
    """A server whose followed streams send a keep-alive space after 0.2 s of silence."""
    yield make_server(base_config(upstream, limits={"results_keepalive_seconds": 0.2}))


def test_keepalive_spaces_and_disconnects(
    slow_server: Server, upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    c = sdk(slow_server)
    upstream.control(latency=0.6)
    n = 64  # two waves of 32, 0.6 s each: silences longer than 0.2 s
    batch_id = _submit(c, n)
    follower = Follower(slow_server, batch_id)
    lines = follower.wait()
    _exactly_once(lines, batch_id, n)
    # Spaces while silent, each before a line (or at the very end); never an empty line.
    raw = bytes(follower.raw)
    assert b"\n {" in raw or raw.startswith(b" ")
    rows = raw.split(b"\n")
    assert all(r.strip() for r in rows[:-1]), "no empty line"
    assert rows[-1].strip() == b""
    assert [json.loads(r) for r in rows[:-1]] == lines  # each line is one JSON value
    # An ended batch's stream has no silence, so no spaces.
    ended = Follower(slow_server, batch_id)
    assert ended.wait() == lines and b" {" not in bytes(ended.raw)

    # A client that goes away: its stream stops (the gauge of open streams goes back to 0).
    upstream.control(latency=5.0)
    batch_id = _submit(c, 32)
    metrics = slow_server.url + "/metrics"
    with httpx2.stream(
        "GET",
        _url(slow_server, batch_id),
        params={"follow": "true"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    ) as resp:
        chunks = resp.iter_bytes()  # kept: a dropped iterator closes the connection
        first = next(chunks)
        assert first and not first.strip()  # keep-alive spaces: no result yet
        wait_metrics(metrics, {m("batchd_results_streams"): 1.0})
    wait_metrics(metrics, {m("batchd_results_streams"): 0.0})
    c.batches.cancel(batch_id)


def test_shutdown_ends_followed_streams(
    slow_server: Server, upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    """SIGTERM while a stream is followed: the stream ends cleanly (its reader resumes with
    ``after``) and the server exits without waiting out uvicorn's graceful-shutdown timeout
    or logging a cancelled task."""
    c = sdk(slow_server)
    upstream.control(latency=30.0)
    batch_id = _submit(c, 4)
    with httpx2.stream(
        "GET",
        _url(slow_server, batch_id),
        params={"follow": "true"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    ) as resp:
        chunks = resp.iter_bytes()
        assert not next(chunks).strip()  # a keep-alive space: the stream is open
        slow_server.proc.proc.terminate()
        rest = b"".join(chunks)  # ends (cleanly: no RemoteProtocolError) when the server stops
    assert not rest.strip()  # nothing was committed: no result line
    # uvicorn ends by raising the signal it caught again, once shut down
    assert slow_server.proc.proc.wait(30) in (0, -signal.SIGTERM)
    log = slow_server.proc.output()
    assert "graceful shutdown exceeded" not in log and "CancelledError" not in log, log[-2000:]
    upstream.control(latency=0.0)


def test_follow_across_a_killed_worker(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    upstream.control(latency=0.02)
    server = make_server(base_config(upstream, engine={"embedded": False}))
    workers = [start_worker(server.config_path, server.config_path.parent, i) for i in range(2)]
    server.workers.extend(workers)
    c = sdk(server, retries=2)
    n = 3000
    batch_id = _submit(c, n)
    follower = Follower(server, batch_id)
    _wait_done(c, batch_id, 400)
    workers[0].kill9()
    lines = follower.wait()
    assert follower.batch_status_at_end == "completed", workers[1].output()[-2000:]
    _exactly_once(lines, batch_id, n)
    assert all(r["response"]["status_code"] == 200 for r in lines)
    assert lines == _files(c, c.batches.retrieve(batch_id))


def test_cli_follow_resumes_across_a_killed_server(
    make_server: Callable[..., Server],
    upstream: Upstream,
    sdk: Callable[..., OpenAI],
    tmp_path: Path,
) -> None:
    upstream.control(latency=0.1)  # 32 in flight: ~300 requests/s, 7 s for 2000
    server = make_server(base_config(upstream))
    c = sdk(server, retries=2)
    n = 2000
    batch_id = _submit(c, n)
    cmd = [*BATCHD, "results", batch_id, "--follow", "--url", server.url, "--key", API_KEY]
    out_path, err_path = tmp_path / "cli.out", tmp_path / "cli.err"
    with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
        cli = subprocess.Popen(cmd, stdout=out_f, stderr=err_f)
    try:
        _wait_done(c, batch_id, 300)
        server.proc.kill9()  # the API and its engine
        port = int(server.url.rsplit(":", 1)[1])
        restarted = start_server(server.config_path, server.config_path.parent, port=port)
        try:
            cli.wait(120)
        finally:
            restarted.proc.stop()
    finally:
        if cli.poll() is None:
            cli.kill()
    out, err = out_path.read_bytes(), err_path.read_bytes()
    assert cli.returncode == 0, err
    assert b"Traceback" not in err and b"reading again after batch_req_" in err
    lines = [json.loads(x) for x in out.splitlines()]
    _exactly_once(lines, batch_id, n)


def test_cli_results_so_far_after_and_outcome(
    client: OpenAI, server: Server, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.control(reject_content="req-2")
    batch_id = _submit(client, 5)
    wait_batch(client, batch_id)
    every = _lines(server, batch_id)

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*BATCHD, "results", batch_id, *args, "--url", server.url, "--key", API_KEY],
            capture_output=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )

    done = cli("--jsonl")
    assert done.returncode == 0 and [json.loads(x) for x in done.stdout.splitlines()] == every
    # without a flag of the stream, the ended batch's files are downloaded (DESIGN.md's CLI)
    done = cli()
    assert done.returncode == 0, done.stderr
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert len(saved) == 2 and all(name.startswith(batch_id) for name in saved)
    done = cli("--after", every[1]["id"], "--outcome", "failed")
    assert [json.loads(x)["custom_id"] for x in done.stdout.splitlines()] == ["req-2"]
    done = cli("--follow", "--outcome", "succeeded")
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 4
    refused = cli("--follow", "--out", "x")
    assert refused.returncode == 2 and b"--out downloads" in refused.stderr
    refused = cli("--after", "nope")
    assert refused.returncode == 2 and b"(HTTP 400)" in refused.stderr


def _page(server: Server, path: str) -> str:
    resp = httpx2.get(server.url + path, headers={"cookie": f"batchd_key={API_KEY}"})
    assert resp.status_code == 200, resp.text
    return resp.text


def _shown(html: str) -> list[str]:
    """The custom_ids of the batch page's latest results, top to bottom."""
    if 'class="result-lines"' not in html:
        return []
    table = html.split('class="result-lines"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr class=\"r-(?:ok|bad)\"><td><code>([^<]*)</code>", table)


def test_the_batch_page_shows_the_latest_results(
    client: OpenAI, server: Server, upstream: Upstream
) -> None:
    hostile = '<script>alert("x")</script> & <b>bold</b>'
    upstream.control(latency=0.3, replies={"req-": hostile})
    n = 200
    batch_id = _submit(client, n)
    _wait_done(client, batch_id, 40)
    running = _page(server, f"/ui/batches/{batch_id}/live")
    assert 'data-status="in_progress"' in running
    shown = _shown(running)
    assert len(shown) == 10
    so_far = [r["custom_id"] for r in _lines(server, batch_id)]
    assert set(shown) <= set(so_far) and shown[0] in so_far[-40:]
    # Escaped, never markup.
    assert "<script>alert" not in running and "&lt;script&gt;alert(" in running
    assert "&lt;b&gt;bold&lt;/b&gt;" in running

    wait_batch(client, batch_id)
    ended = _page(server, f"/ui/batches/{batch_id}")
    every = _lines(server, batch_id)
    assert _shown(ended) == [r["custom_id"] for r in every[::-1][:10]]
