"""Shared code for the benchmarks: the processes (fake upstream, ``batchd serve``, ``batchd
worker``, reused from ``tests/support.py``), the hand-written asyncio + aiohttp baseline client,
the batchd round trip with the ``openai`` SDK, RSS and CPU sampling, and the markdown table.

Every benchmark runs its baseline in the same run and reports a ratio: the machines are shared
and noisy, so only ratios measured side by side mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgspec  # noqa: E402
import psutil  # noqa: E402
from openai import OpenAI  # noqa: E402
from tests.support import (  # noqa: E402
    Proc,
    Server,
    Upstream,
    chat_lines,
    start_server,
    start_upstream,
    start_worker,
    write_config,
)

__all__ = [
    "API_KEY",
    "Proc",
    "Sampler",
    "Server",
    "Stack",
    "Upstream",
    "baseline_run",
    "batchd_run",
    "chat_lines",
    "machine",
    "parser",
    "print_table",
]

API_KEY = "sk-bench"
MODEL = "gpt-4o"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the bench runs")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--profile",
        metavar="PREFIX",
        help="record py-spy profiles of the batchd processes during the measured run "
        "(PREFIX-<pid>.svg flame graph and PREFIX-<pid>.txt collapsed stacks)",
    )
    return p


@contextlib.contextmanager
def profiled(prefix: str | None, pids: Sequence[int]) -> Iterator[None]:
    """py-spy record of each pid while the block runs (nothing when ``prefix`` is None)."""
    if not prefix:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    procs = []
    for pid in dict.fromkeys(pids):
        for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
            procs.append(
                subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--rate", "250", "--subprocesses",
                     "--format", fmt, "--output", f"{prefix}-{pid}.{ext}", "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    time.sleep(0.5)
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(30)


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- processes --
@dataclass
class Stack:
    """A fake upstream and a batchd server (plus workers) in one temporary directory."""

    tmp: Path
    upstream: Upstream
    server: Server
    workers: list[Proc] = field(default_factory=list)

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.server.url + "/v1", api_key=API_KEY, max_retries=0)

    def engine_pids(self) -> list[int]:
        """The processes that run the engine: the workers, else the server (and children)."""
        if self.workers:
            return [w.proc.pid for w in self.workers]
        return [self.server.proc.proc.pid]


def bench_config(
    upstream: Upstream,
    *,
    max_concurrency: int = 64,
    embedded: bool = True,
    engine: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    content_filter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    extra = {"content_filter": content_filter} if content_filter else {}
    return {
        **extra,
        "auth": {"keys": {API_KEY: "bench"}},
        "deployments": [
            {
                "model": MODEL,
                "backend": "openai",
                "base_url": upstream.v1,
                "max_concurrency": max_concurrency,
            }
        ],
        "engine": {"embedded": embedded, **(engine or {})},
        "limits": {"max_files": 100_000, **(limits or {})},
        "log_level": "warning",
    }


@contextlib.contextmanager
def stack(
    *,
    latency: float = 0.0,
    max_concurrency: int = 64,
    workers: int = 0,
    engine: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    content_filter: dict[str, Any] | None = None,
    keep: bool = False,
) -> Iterator[Stack]:
    """Start the fake upstream and ``batchd serve``; with ``workers`` > 0 the server runs no
    engine (``[engine] embedded = false``) and that many ``batchd worker`` processes do."""
    tmp = Path(tempfile.mkdtemp(prefix="batchd-bench-"))
    procs: list[Proc] = []
    try:
        up = start_upstream(tmp, latency)
        procs.append(up.proc)
        cfg = bench_config(
            up,
            max_concurrency=max_concurrency,
            embedded=workers == 0,
            engine=engine,
            limits=limits,
            content_filter=content_filter,
        )
        path = write_config(tmp, cfg)
        server = start_server(path, tmp)
        procs.append(server.proc)
        ws = [start_worker(path, tmp, i) for i in range(workers)]
        procs.extend(ws)
        yield Stack(tmp, up, server, ws)
    finally:
        for p in reversed(procs):
            p.stop()
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- sampling --
class Sampler:
    """Samples the RSS (with children) and CPU time of processes on a thread."""

    def __init__(self, pids: Sequence[int], interval: float = 0.02) -> None:
        self._procs = [psutil.Process(p) for p in dict.fromkeys(pids)]
        self._interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._cpu0 = 0.0
        self.cpu_seconds = 0.0

    def _tree(self) -> list[psutil.Process]:
        out: list[psutil.Process] = []
        for p in self._procs:
            with contextlib.suppress(psutil.Error):
                out.append(p)
                out.extend(p.children(recursive=True))
        return out

    def rss(self) -> int:
        total = 0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu(self) -> float:
        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            self._stop.wait(self._interval)

    def __enter__(self) -> Sampler:
        self._cpu0 = self.cpu()
        self.peak_rss = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_seconds = self.cpu() - self._cpu0
        self._stop.set()
        self._thread.join()


# -- the baseline: a hand-written asyncio + aiohttp client --
class _Line(msgspec.Struct):
    custom_id: str
    body: msgspec.Raw


async def _baseline(url: str, data: bytes, concurrency: int) -> tuple[int, bytes]:
    """What a user would write: read the JSONL, fire each body at the model server with at
    most ``concurrency`` in flight, write ``{"custom_id", "response"}`` lines."""
    decoder = msgspec.json.Decoder(_Line)
    lines = [decoder.decode(raw) for raw in data.splitlines() if raw.strip()]
    queue: asyncio.Queue[_Line] = asyncio.Queue()
    for line in lines:
        queue.put_nowait(line)
    out = io.BytesIO()
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, headers={"content-type": "application/json"}
    ) as session:

        async def worker() -> None:
            nonlocal ok
            while not queue.empty():
                line = queue.get_nowait()
                async with session.post(url, data=bytes(line.body)) as resp:
                    body = await resp.read()
                    ok += resp.status == 200
                out.write(b'{"custom_id":"%s","status":%d,"body":%s}\n' % (
                    line.custom_id.encode(), resp.status, body))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, out.getvalue()


def baseline_run(upstream: Upstream, data: bytes, concurrency: int = 64) -> tuple[float, int]:
    """Seconds for the hand-written client to run every line of ``data``; lines answered 200."""
    url = upstream.v1 + "/chat/completions"
    t0 = time.perf_counter()
    try:
        import uvloop

        ok, _ = uvloop.run(_baseline(url, data, concurrency))
    except ImportError:
        ok, _ = asyncio.run(_baseline(url, data, concurrency))
    return time.perf_counter() - t0, ok


# -- batchd, end to end with the openai SDK --
@dataclass
class BatchdResult:
    seconds: float
    completed: int
    failed: int
    output_bytes: int
    batch_id: str
    phases: dict[str, float]
    wall: tuple[float, float, float] = (0.0, 0.0, 0.0)  # unix s: start, uploaded, done seen


def batchd_run(client: OpenAI, data: bytes, *, poll: float = 0.05, timeout: float = 900) -> (
    BatchdResult
):
    """Upload, create, poll until done, download the output: seconds end to end. Polls every
    ``poll`` seconds while requests run, then every 5 ms once every request is done, so that
    the end is seen within a few ms of the batch's (the poll's period is not measured)."""
    t0 = time.perf_counter()
    w0 = time.time()
    f = client.files.create(file=("bench.jsonl", data), purpose="batch")
    t_up = time.perf_counter()
    w_up = time.time()
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.time() + timeout
    while b.status not in ("completed", "failed", "cancelled", "expired"):
        if time.time() > deadline:
            raise TimeoutError(f"batch {b.id} still {b.status}: {b.request_counts}")
        counts = b.request_counts
        finishing = counts is not None and counts.total and (
            counts.completed + counts.failed >= counts.total
        )
        time.sleep(0.005 if finishing else poll)
        b = client.batches.retrieve(b.id)
    t_done = time.perf_counter()
    w_done = time.time()
    size = 0
    if b.output_file_id:
        size = len(client.files.content(b.output_file_id).content)
    t_end = time.perf_counter()
    counts = b.request_counts
    return BatchdResult(
        t_end - t0,
        counts.completed if counts else 0,
        counts.failed if counts else 0,
        size,
        b.id,
        {"upload": t_up - t0, "run": t_done - t_up, "download": t_end - t_done},
        (w0, w_up, w_done),
    )


# -- output --
def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n### {title}\n")
    print(f"machine: {machine()}; date: {now_utc()}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(v) for v in row) + " |")
    sys.stdout.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        if v >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def mb(n: int) -> float:
    return n / (1024 * 1024)
