"""The client commands against a real server, run as the user runs them (a subprocess): the
flow (submit --wait, ls, show, results, retry, cancel), the results written beside the input,
and every user mistake answered with one line and exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import API_KEY
from tests.support import Server, Upstream, chat_lines, free_port, read_jsonl


def batchd(
    server: Server | None,
    *args: str,
    cwd: Path,
    url: str | None = None,
    key: str = API_KEY,
) -> subprocess.CompletedProcess[str]:
    target = url if url is not None else server.url if server is not None else ""
    return subprocess.run(
        [sys.executable, "-m", "batchd.cli", *args, "--url", target, "--key", key],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def mistake(done: subprocess.CompletedProcess[str], *says: str) -> None:
    """Exit status 2 and one line on stderr that says each of ``says``; no traceback."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchd: "), done.stderr
    for text in says:
        assert text in lines[0], (text, lines[0])


def test_client_commands(server: Server, upstream: Upstream, tmp_path: Path) -> None:
    upstream.control(reject_content="req-3")
    path = tmp_path / "in.jsonl"
    path.write_bytes(chat_lines(5))
    done = batchd(server, "submit", str(path), "--wait", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    batch_id = done.stdout.splitlines()[0]
    assert batch_id.startswith("batch_") and "completed" in done.stdout
    # stderr is not a terminal here: plain progress lines, the last one the final counts.
    assert "completed: 5/5 done, 1 failed" in done.stderr.splitlines()
    assert "\x1b[" not in done.stderr and "\r" not in done.stderr
    # The results, beside the input, and where they are.
    out_path, err_path = tmp_path / "in.output.jsonl", tmp_path / "in.errors.jsonl"
    assert f"output: {out_path}" in done.stdout.splitlines()
    assert f"errors: {err_path}" in done.stdout.splitlines()
    assert f"1 request failed: see {err_path}" in done.stderr
    assert sorted(r["custom_id"] for r in read_jsonl(out_path.read_text())) == [
        "req-0",
        "req-1",
        "req-2",
        "req-4",
    ]
    [failed] = read_jsonl(err_path.read_text())
    assert failed["custom_id"] == "req-3" and failed["response"]["status_code"] == 400
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == [
        "in.errors.jsonl",
        "in.jsonl",
        "in.output.jsonl",
    ]  # no partial files left

    listed = batchd(server, "ls", cwd=tmp_path)
    assert batch_id in listed.stdout
    shown = json.loads(batchd(server, "show", batch_id, cwd=tmp_path).stdout)
    assert shown["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    # results: a folder that does not exist yet is made.
    got = batchd(server, "results", batch_id, "--out", str(tmp_path / "r" / "s"), cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    out = (tmp_path / "r" / "s" / f"{batch_id}.output.jsonl").read_text().splitlines()
    err = (tmp_path / "r" / "s" / f"{batch_id}.errors.jsonl").read_text().splitlines()
    assert len(out) == 4 and len(err) == 1
    # Retry: a new batch of just the failed request, which now succeeds.
    upstream.control(reject_content=None)
    again = batchd(server, "retry", batch_id, "--out", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    retry_id = again.stdout.strip()
    lines = (tmp_path / f"{batch_id}_retry.jsonl").read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in lines] == ["req-3"]
    # Cancelling a batch that has ended is refused (409): one line, exit 2.
    ended = batchd(server, "cancel", batch_id, cwd=tmp_path)
    mistake(ended, "(HTTP 409)")
    # A cancelled batch's files are saved, and the exit status says it did not complete (1).
    upstream.control(latency=5.0)
    slow = batchd(server, "submit", str(path), cwd=tmp_path)
    slow_id = slow.stdout.strip()
    assert batchd(server, "cancel", slow_id, cwd=tmp_path).returncode == 0
    for _ in range(200):
        got = batchd(server, "results", slow_id, "--out", str(tmp_path / "c"), cwd=tmp_path)
        if "is still" not in got.stderr:
            break
    assert got.returncode == 1, (got.stdout, got.stderr)
    assert "ended cancelled" in got.stderr
    assert (tmp_path / "c" / f"{slow_id}.errors.jsonl").exists()
    upstream.control(latency=0.0)
    assert batchd(server, "show", retry_id, cwd=tmp_path).returncode == 0


def test_submit_wait_out_folder(server: Server, upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(chat_lines(3))
    out = tmp_path / "new" / "results"
    done = batchd(server, "submit", str(path), "--wait", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"output: {out / 'jobs.output.jsonl'}" in done.stdout.splitlines()
    assert len(read_jsonl((out / "jobs.output.jsonl").read_text())) == 3
    assert not (out / "jobs.errors.jsonl").exists()  # nothing failed: no error file
    assert "failed: see" not in done.stderr


def test_submit_wait_on_a_batch_that_fails(server: Server, tmp_path: Path) -> None:
    rows = chat_lines(3).decode().splitlines()
    rows[1] = "{not json"
    rows.append(rows[0])  # line 4: the custom_id of line 1 again
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    done = batchd(server, "submit", str(path), "--wait", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "failed" in done.stdout.splitlines()[1]
    errors = [x.strip() for x in done.stderr.splitlines() if x.startswith("  line ")]
    assert [e.split(":")[0:2] for e in errors] == [
        ["line 2", " invalid_json_line"],
        ["line 4", " duplicate_custom_id"],
    ]
    assert not list(tmp_path.glob("bad.*.jsonl"))  # a failed batch has no files
    # `results` of the failed batch says so as `submit --wait` does: exit 2, its errors listed.
    failed_id = done.stdout.splitlines()[0]
    got = batchd(server, "results", failed_id, "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert got.returncode == 2, (got.stdout, got.stderr)
    assert "line 2: invalid_json_line" in got.stderr and "Traceback" not in got.stderr
    # Without --wait too, a file that is not JSONL past its first line is not exit 0.
    quiet = batchd(server, "submit", str(path), cwd=tmp_path)
    assert quiet.returncode == 2 and "line 2: invalid_json_line" in quiet.stderr
    assert "Traceback" not in quiet.stderr


def test_the_url_may_be_the_root_or_a_base_url(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_bytes(chat_lines(1))
    made = batchd(server, "submit", str(path), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    batch_id = made.stdout.strip()
    for url in (server.url, server.url + "/", server.url + "/v1", server.url + "/v1/",
                server.url + "/openai/v1", server.url + "/openai"):  # fmt: skip
        shown = batchd(server, "show", batch_id, cwd=tmp_path, url=url)
        assert shown.returncode == 0, (url, shown.stderr)
        assert json.loads(shown.stdout)["id"] == batch_id


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d / "nope.jsonl", ["no such file:", "nope.jsonl"]),
        (lambda d: d, ["is a folder"]),
        (
            lambda d: _write(d / "people.csv", "name,age\nada,36\n"),
            ["people.csv is not JSONL: line 1 is not a JSON object", '"custom_id"'],
        ),
        (
            lambda d: _write(d / "blank.jsonl", "\n\n"),
            ["blank.jsonl is empty"],
        ),
        (
            lambda d: _write(d / "reqs.json", chat_lines(1).decode()),
            ["rename it to reqs.jsonl"],
        ),
    ],
    ids=["missing", "folder", "csv", "empty", "not-named-jsonl"],
)
def test_input_file_mistakes(
    server: Server, tmp_path: Path, make: Callable[[Path], Path], says: list[str]
) -> None:
    path = make(tmp_path)
    mistake(batchd(server, "submit", str(path), "--wait", cwd=tmp_path), *says)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_server_and_id_mistakes(server: Server, upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(chat_lines(1))
    nobody = f"http://127.0.0.1:{free_port()}"
    mistake(batchd(None, "ls", cwd=tmp_path, url=nobody), "cannot reach", "--url or BATCHD_URL")
    mistake(batchd(None, "submit", str(path), cwd=tmp_path, url=nobody), "cannot reach")
    mistake(batchd(None, "ls", cwd=tmp_path, url="ftp://x"), "is not an http(s) address")
    # A server that is not batchd (the fake model server answers 404 in plain text).
    mistake(batchd(None, "ls", cwd=tmp_path, url=upstream.url), "is --url the address of")
    mistake(batchd(server, "ls", cwd=tmp_path, key="sk-wrong"), "refused the key", "--key")
    for command in ("show", "cancel", "results", "retry"):
        mistake(
            batchd(server, command, "batch_nope", cwd=tmp_path),
            "No such Batch object: batch_nope",
            "batchd ls",
        )
    (tmp_path / "taken").write_text("a file")
    mistake(
        batchd(server, "submit", str(path), "--wait", "--out", str(tmp_path / "taken"),
               cwd=tmp_path),
        "is a file, not a folder",
    )  # fmt: skip
    mistake(batchd(server, "submit", str(path), "--out", str(tmp_path), cwd=tmp_path), "--wait")
    mistake(batchd(server, "ls", "--limit", "0", cwd=tmp_path), "(HTTP 400)")
