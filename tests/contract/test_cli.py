"""The client commands against a real server: submit --wait, ls, show, results, retry, cancel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import API_KEY
from tests.support import Server, Upstream, chat_lines


def batchd(server: Server, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd.cli", *args, "--url", server.url, "--key", API_KEY],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def test_client_commands(server: Server, upstream: Upstream, tmp_path: Path) -> None:
    upstream.control(reject_content="req-3")
    path = tmp_path / "in.jsonl"
    path.write_bytes(chat_lines(5))
    done = batchd(server, "submit", str(path), "--wait", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.splitlines()[0]
    assert batch_id.startswith("batch_") and "completed" in done.stdout
    listed = batchd(server, "ls", cwd=tmp_path)
    assert batch_id in listed.stdout
    shown = json.loads(batchd(server, "show", batch_id, cwd=tmp_path).stdout)
    assert shown["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    got = batchd(server, "results", batch_id, "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert got.returncode == 0
    out = (tmp_path / "r" / f"{batch_id}_output.jsonl").read_text().splitlines()
    err = (tmp_path / "r" / f"{batch_id}_errors.jsonl").read_text().splitlines()
    assert len(out) == 4 and len(err) == 1
    # Retry: a new batch of just the failed request, which now succeeds.
    upstream.control(reject_content=None)
    again = batchd(server, "retry", batch_id, "--out", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    retry_id = again.stdout.strip()
    lines = (tmp_path / f"{batch_id}_retry.jsonl").read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in lines] == ["req-3"]
    assert batchd(server, "cancel", retry_id, cwd=tmp_path).returncode in (0, 1)
    missing = batchd(server, "show", "batch_nope", cwd=tmp_path)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
