"""Real processes for tests: a fake upstream, ``batchd serve`` and ``batchd worker`` on ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

BATCHD = [sys.executable, "-m", "batchd.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(method: str, url: str, body: Any = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready:\n{log.read_text()[-3000:]}")


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    full_env = {**os.environ, **(env or {})}
    fh = log.open("ab")
    proc = subprocess.Popen(
        cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, stdin=subprocess.DEVNULL
    )
    fh.close()
    return Proc(proc, log)


@dataclass
class Upstream:
    url: str  # base, without /v1
    proc: Proc

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def control(self, **switches: Any) -> Any:
        return http_json("POST", self.url + "/_control", switches)

    def stats(self) -> Any:
        return http_json("GET", self.url + "/_stats")

    def reset(self) -> None:
        http_json("POST", self.url + "/_reset", {})


def start_upstream(tmp: Path, latency: float = 0.0) -> Upstream:
    port = free_port()
    log = tmp / f"upstream-{port}.log"
    proc = spawn(
        [
            sys.executable,
            "-m",
            "batchd.testing.fake_upstream",
            "--port",
            str(port),
            "--latency",
            str(latency),
        ],
        log,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_stats", proc.proc, log)
    return Upstream(url, proc)


@dataclass
class Server:
    url: str
    config_path: Path
    data_dir: Path
    proc: Proc
    workers: list[Proc] = field(default_factory=list)


def write_config(tmp: Path, config: dict[str, Any], name: str = "batchd.toml") -> Path:
    cfg = {"data_dir": str(tmp / "data"), **config}
    path = tmp / name
    path.write_text(tomli_w.dumps(cfg))
    return path


def start_server(config_path: Path, tmp: Path, port: int | None = None) -> Server:
    port = port or free_port()
    log = tmp / f"serve-{port}.log"
    proc = spawn([*BATCHD, "serve", "--config", str(config_path), "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc.proc, log)
    import tomllib

    data_dir = Path(tomllib.loads(config_path.read_text())["data_dir"])
    return Server(url, config_path, data_dir, proc)


def start_worker(config_path: Path, tmp: Path, n: int) -> Proc:
    log = tmp / f"worker-{n}.log"
    return spawn([*BATCHD, "worker", "--config", str(config_path)], log)


def chat_lines(
    n: int, model: str = "gpt-4o", url: str = "/v1/chat/completions", prefix: str = "req"
) -> bytes:
    rows = [
        json.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": url,
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"{prefix}-{i}"}],
                },
            }
        )
        for i in range(n)
    ]
    return ("\n".join(rows) + "\n").encode()


def wait_batch(
    client: Any,
    batch_id: str,
    timeout: float = 60,
    statuses: tuple[str, ...] = ("completed", "failed", "cancelled", "expired"),
) -> Any:
    deadline = time.time() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        if time.time() > deadline:
            raise TimeoutError(f"batch {batch_id} still {b.status}: {b.request_counts}")
        time.sleep(0.2)


def message_requests(
    n: int, *, prefix: str, model: str, max_tokens: int, **params: Any
) -> list[dict[str, Any]]:
    """``n`` requests of an Anthropic message batch: custom_id ``<prefix>-<i>``, one user
    message ``<prefix>-<i>``, ``params`` added to each request's params."""
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "params": {
                "model": model,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"{prefix}-{i}"}],
                **params,
            },
        }
        for i in range(n)
    ]


def wait_ended(client: Any, batch_id: str, timeout: float = 90) -> Any:
    """The message batch once its ``processing_status`` is ``ended`` (``client``: an
    ``anthropic.Anthropic``); fails the test after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        b = client.messages.batches.retrieve(batch_id)
        if b.processing_status == "ended":
            return b
        assert time.time() < deadline, f"{batch_id} still {b.processing_status}"
        time.sleep(0.2)


def read_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- PostgreSQL and an S3-compatible server, for the scale-out tests ----------------------------
PG_ADMIN = os.environ.get("BATCHD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_url(database: str) -> str:
    """The URL of ``database`` on the test server (``BATCHD_TEST_PG`` names its admin database)."""
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + database


def pg_admin(*statements: str) -> None:
    """Run statements on the admin database (CREATE/DROP DATABASE cannot run in a transaction)."""
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def pg_reachable() -> bool:
    try:
        pg_admin("SELECT 1")
    except (OSError, ConnectionError, TimeoutError):
        return False
    return True


def start_moto(tmp: Path) -> tuple[str, Proc]:
    """moto's S3 server on a free port; returns its endpoint URL."""
    port = free_port()
    log = tmp / f"moto-{port}.log"
    proc = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", proc.proc, log)
    return url, proc


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def fresh_database(prefix: str, template: str | None = None) -> Iterator[str]:
    """A database of its own (a copy of ``template`` if given), dropped afterwards; its URL."""
    require_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    pg_admin(f'CREATE DATABASE "{name}"{copy}')
    try:
        yield pg_url(name)
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def require_postgres() -> None:
    """Skip when there is no PostgreSQL here, except in CI, where it must run."""
    import pytest

    if not pg_reachable():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable and CI is set: the PostgreSQL tests must run")
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
