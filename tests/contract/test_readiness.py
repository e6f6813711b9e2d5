"""/readyz says whether batches can run; with no engine, batches queue (nothing lost) and the
log says why; an engine process that keeps dying is restarted with a backoff."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from batchd import cli
from tests.conftest import base_config
from tests.support import (
    BATCHD,
    Server,
    Upstream,
    chat_lines,
    free_port,
    start_worker,
    wait_batch,
    wait_http,
    write_config,
)


def readyz(server: Server) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(server.url + "/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_no_engine_not_ready_and_batches_queue(
    make_server: Callable[..., Server],
    upstream: Upstream,
    sdk: Callable[..., OpenAI],
    tmp_path: Path,
) -> None:
    server = make_server(base_config(upstream, engine={"embedded": False}))
    status, body = readyz(server)
    assert (status, body["status"], body["store"], body["engines"]) == (503, "not_ready", "ok", 0)
    c = sdk(server)
    file = c.files.create(file=("q.jsonl", chat_lines(3)), purpose="batch")
    batch = c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "in_progress"  # queued, not refused and not lost
    time.sleep(0.5)
    assert c.batches.retrieve(batch.id).request_counts.completed == 0
    assert f"batch {batch.id} is queued: no engine is alive" in server.proc.output()
    server.workers.append(start_worker(server.config_path, tmp_path, 1))
    deadline = time.time() + 30
    while readyz(server)[0] != 200:
        assert time.time() < deadline, readyz(server)
        time.sleep(0.2)
    assert readyz(server)[1]["engines"] == 1
    done = wait_batch(c, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3


def test_embedded_engine_is_ready(server: Server) -> None:
    deadline = time.time() + 20  # the engine process starts after the API answers
    while (result := readyz(server))[0] != 200 and time.time() < deadline:
        time.sleep(0.1)
    status, body = result
    assert status == 200 and body["status"] == "ready" and body["engines"] >= 1
    assert body["engine_process"]["alive"] is True
    assert body["engine_process"]["restarts"] == 0


def test_a_dying_engine_is_restarted_with_backoff(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "ENGINE_RESTART_SECONDS", 0.2)
    engine = cli.EngineProcess(None)
    script = "import sys; sys.stderr.write('x ERROR batchd: boom (bad weights)\\n'); sys.exit(3)"
    engine._cmd = [sys.executable, "-c", script]

    async def run() -> None:
        async with engine.running():
            await asyncio.sleep(2.5)

    asyncio.run(run())
    status = engine.status()
    # 0.2, 0.4, 0.8, 1.6 s between starts: a few restarts in 2.5 s, never one a tick
    assert 1 <= status["restarts"] <= 4, status
    assert status["last_exit_code"] == 3
    assert status["last_error"] == "x ERROR batchd: boom (bad weights)"
    assert status["alive"] is False and status["next_start_in_seconds"] is not None
    assert "boom (bad weights)" in capfd.readouterr().err  # its output is passed on


def test_ctrl_c_stops_serve_and_its_engine_quietly(upstream: Upstream, tmp_path: Path) -> None:
    """A terminal's Ctrl-C sends SIGINT to the whole process group, so the engine child
    stops too, at the same time as the server: that is a shutdown, not an engine to start
    again (no ERROR line, exit without a traceback)."""
    port = free_port()
    config = write_config(tmp_path, base_config(upstream))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*BATCHD, "serve", "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        deadline = time.time() + 30
        while "engine" not in log.read_text() or "started" not in log.read_text():
            assert time.time() < deadline, log.read_text()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) in (0, -signal.SIGINT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert " ERROR " not in text and "Traceback" not in text, text[-3000:]
    assert "the engine process stopped" in text
