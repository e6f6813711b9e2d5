"""Files private by default (issue 10): a real server's data directory is 0700 and every
file it writes 0600 (database, WAL, inputs, results, journals), whatever the umask; the
modes are settings; and a configuration error never prints a secret."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from openai import OpenAI

from tests.conftest import base_config
from tests.support import BATCHD, Server, Upstream, chat_lines, wait_batch, write_config


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def modes_under(root: Path) -> tuple[set[int], set[int]]:
    """The modes of the folders, and of the files but prometheus_client's counters (written
    by the library under the umask, in the private metrics/ folder)."""
    dirs, files = {mode(root)}, set()
    for p in root.rglob("*"):
        if p.is_dir():
            dirs.add(mode(p))
        elif p.parent.parent.name != "metrics":
            files.add(mode(p))
    return dirs, files


def run_a_batch(client: OpenAI) -> None:
    f = client.files.create(file=("in.jsonl", chat_lines(5)), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    b = wait_batch(client, b.id)
    assert b.status == "completed" and b.output_file_id


def test_private_by_default(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    old = os.umask(0o022)  # the usual umask, inherited by the server
    try:
        server = make_server(base_config(upstream))
    finally:
        os.umask(old)
    run_a_batch(sdk(server))
    data = server.data_dir
    assert (data / "batchd.db").exists() and (data / "batchd.db-wal").exists()
    assert len(list((data / "files").rglob("file-*"))) >= 2  # the input and the output
    dirs, files = modes_under(data)
    assert dirs == {0o700}
    assert files == {0o600}


def test_modes_are_settings_and_an_old_data_dir_is_closed(
    make_server: Callable[..., Server],
    upstream: Upstream,
    sdk: Callable[..., OpenAI],
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    os.chmod(data, 0o777)  # world-writable from an older install
    server = make_server(base_config(upstream, data_dir_mode="0750", data_file_mode="0640"))
    run_a_batch(sdk(server))
    assert mode(data) == 0o750
    assert mode(data / "batchd.db") == 0o640
    assert mode(data / "files" / "inputs") == 0o750
    assert {mode(p) for p in (data / "files").rglob("file-*")} == {0o640}


def test_config_errors_never_print_a_secret(tmp_path: Path) -> None:
    key, upstream_key, password = "sk-live-0123456789abcdef", "up-9876543210fedcba", "hunter2pw"
    cfg = write_config(
        tmp_path,
        {
            "database_url": f"mysql://admin:{password}@db.internal/batchd",
            "auth": {"keys": {key: 5}},
            "deployments": [
                {
                    "model": "m",
                    "base_url": f"http://u:{password}@127.0.0.1:1/v1",
                    "api_key": upstream_key,
                    "max_concurrency": "lots",
                }
            ],
        },
    )
    out = subprocess.run(
        [*BATCHD, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "auth.keys.sk-l…" in text and "deployments.0.max_concurrency" in text
    for secret in (key, upstream_key, password):
        assert secret not in text
    # A database URL with a scheme batchd does not know: named by its scheme only.
    cfg = write_config(tmp_path, {"database_url": f"mysql://admin:{password}@db/x"}, "b.toml")
    out = subprocess.run(
        [*BATCHD, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "'mysql'" in out.stdout + out.stderr
    assert password not in out.stdout + out.stderr
