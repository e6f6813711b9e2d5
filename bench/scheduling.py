"""Scheduling: fair shares between projects and batches, and adaptive concurrency, against the
fake upstream's capacity model (it serves K requests at once with latency L, queues the rest
with growing latency, and answers 429 past a queue of K).

- **fairness**: project A's big batch runs (16 slots, L = 0.2 s); a 20-line batch of project B,
  then one of project A, are submitted. Reported: the seconds each small batch took from
  creation to completed (target < 15) and A's big-batch throughput over a 15 s window that
  holds both, relative to its throughput over 15 s alone just before (target >= 0.8).
- **adaptive**: for K = 8, 32 and 128 (L = 0.1 s), a batch runs with fixed limits K/2, K and 2K
  and with ``max_concurrency = "auto"``. Reported: throughput of each, ``auto`` / the best fixed
  one (target >= 0.9), and the share of requests answered 429 (target < 1%).
- **interactive**: K = 32, an ``auto`` batch runs while a client sends one interactive request at
  a time straight to the upstream; its latency must stay under 2 L.

Run: ``python bench/scheduling.py [--quick] [--only fairness|adaptive|interactive]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai import OpenAI
from tests.support import Upstream, start_server, start_upstream, write_config

from common import chat_lines, parser, print_table

KEYS = {"sk-a": "project-a", "sk-b": "project-b"}
MODEL = "gpt-4o"


def config(upstream: Upstream, max_concurrency: int | str, **engine: Any) -> dict[str, Any]:
    return {
        "auth": {"keys": KEYS},
        "deployments": [
            {
                "model": MODEL,
                "base_url": upstream.v1,
                "max_concurrency": max_concurrency,
                "max_concurrency_cap": 512,
            }
        ],
        "engine": {"poll_seconds": 0.1, **engine},
        "limits": {"max_files": 100_000},
        "log_level": "warning",
    }


class Server:
    def __init__(self, tmp: Path, upstream: Upstream, max_concurrency: int | str, **eng: Any):
        path = write_config(tmp, config(upstream, max_concurrency, **eng), f"c{time.time()}.toml")
        self.server = start_server(path, tmp)
        self.clients = {
            key: OpenAI(base_url=self.server.url + "/v1", api_key=key, max_retries=2)
            for key in KEYS
        }

    def submit(self, key: str, data: bytes) -> str:
        c = self.clients[key]
        f = c.files.create(file=("in.jsonl", data), purpose="batch")
        return c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id

    def retrieve(self, key: str, batch_id: str) -> Any:
        return self.clients[key].batches.retrieve(batch_id)

    def wait(self, key: str, batch_id: str, timeout: float = 600) -> Any:
        deadline = time.time() + timeout
        while True:
            b = self.retrieve(key, batch_id)
            if b.status in ("completed", "failed", "cancelled", "expired"):
                return b
            if time.time() > deadline:
                raise TimeoutError(f"{batch_id} still {b.status}")
            time.sleep(0.1)

    def stop(self) -> None:
        for c in self.clients.values():
            c.close()
        self.server.proc.stop()


def done(s: Server, key: str, batch_id: str) -> int:
    counts = s.retrieve(key, batch_id).request_counts
    return counts.completed + counts.failed


def rate(s: Server, key: str, batch_id: str, seconds: float) -> float:
    before, t0 = done(s, key, batch_id), time.perf_counter()
    time.sleep(seconds)
    return (done(s, key, batch_id) - before) / (time.perf_counter() - t0)


def fairness(tmp: Path, quick: bool) -> list[list[Any]]:
    up = start_upstream(tmp, latency=0.2)
    s = Server(tmp, up, 16)
    try:
        big = s.submit("sk-a", chat_lines(2000 if quick else 20_000, prefix="big"))
        while done(s, "sk-a", big) < 100:
            time.sleep(0.2)
        window = 5 if quick else 15
        alone = rate(s, "sk-a", big, window)
        rows = [["A's big batch alone", "", f"{alone:.1f} req/s over {window} s", ""]]
        start_done, t0 = done(s, "sk-a", big), time.perf_counter()
        for key, who in (("sk-b", "B's 20-line batch"), ("sk-a", "A's own 20-line batch")):
            created = time.perf_counter()
            small = s.wait(key, s.submit(key, chat_lines(20, prefix=who[:1])))
            took = time.perf_counter() - created
            rows.append([who, f"{took:.1f} s", "", "met" if took < 15 else "NOT met"])
        # over a window of the same length that holds both small batches
        time.sleep(max(0.0, window - (time.perf_counter() - t0)))
        beside = (done(s, "sk-a", big) - start_done) / (time.perf_counter() - t0)
        assert small.request_counts.completed == 20
        ratio = beside / alone
        rows.append(
            ["A's big batch over the same window with them", "",
             f"{beside:.1f} req/s ({ratio:.2f} of alone)",
             "met" if ratio >= 0.8 else "NOT met"]
        )
        s.clients["sk-a"].batches.cancel(big)
        return rows
    finally:
        s.stop()
        up.proc.stop()


def one_run(tmp: Path, up: Upstream, limit: int | str, n: int) -> tuple[float, float]:
    """Throughput (req/s, create to completed) and the share of upstream answers that were 429."""
    up.reset()
    s = Server(tmp, up, limit)
    try:
        t0 = time.perf_counter()
        b = s.wait("sk-a", s.submit("sk-a", chat_lines(n)))
        seconds = time.perf_counter() - t0
        assert b.request_counts.completed == n, b.request_counts
        stats = up.stats()
        total = sum(stats["status"].values())
        return n / seconds, stats["status"].get("429", 0) / max(1, total)
    finally:
        s.stop()


def adaptive(tmp: Path, quick: bool) -> list[list[Any]]:
    latency = 0.1
    up = start_upstream(tmp, latency=latency)
    rows = []
    try:
        for k in (8, 32, 128):
            up.control(capacity=k, queue_limit=k)
            n = k * (20 if quick else 100)
            fixed = {lim: one_run(tmp, up, lim, n) for lim in (max(1, k // 2), k, 2 * k)}
            auto_rate, auto_429 = one_run(tmp, up, "auto", n)
            best = max(r for r, _ in fixed.values())
            for lim, (r, share) in fixed.items():
                rows.append([k, f"fixed {lim}", f"{r:.0f}", f"{r / best:.2f}", f"{share:.2%}", ""])
            ratio = auto_rate / best
            ok = ratio >= 0.9 and auto_429 < 0.01
            rows.append([k, "auto", f"{auto_rate:.0f}", f"**{ratio:.2f}**", f"{auto_429:.2%}",
                         "met" if ok else "NOT met"])
    finally:
        up.control(capacity=0, queue_limit=1_000_000)
        up.proc.stop()
    return rows


def interactive(tmp: Path, quick: bool) -> list[list[Any]]:
    latency, k = 0.1, 32
    up = start_upstream(tmp, latency=latency)
    up.control(capacity=k, queue_limit=4 * k)
    s = Server(tmp, up, "auto")
    seen: list[float] = []
    stop = threading.Event()
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "interactive"}]}'

    def probe() -> None:
        while not stop.is_set():
            req = urllib.request.Request(up.v1 + "/chat/completions", data=body, method="POST")
            req.add_header("content-type", "application/json")
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
            seen.append(time.perf_counter() - t0)
            time.sleep(0.05)

    try:
        batch = s.submit("sk-a", chat_lines(k * (30 if quick else 150)))
        while done(s, "sk-a", batch) < k * 5:  # past the start-up probe
            time.sleep(0.1)
        thread = threading.Thread(target=probe)
        thread.start()
        s.wait("sk-a", batch)
        stop.set()
        thread.join()
    finally:
        s.stop()
        up.proc.stop()
    p95 = statistics.quantiles(seen, n=20)[-1]
    return [[k, len(seen), f"{statistics.median(seen):.3f}", f"{p95:.3f}", f"{max(seen):.3f}",
             f"{2 * latency:.3f}", "met" if p95 < 2 * latency else "NOT met"]]


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--only", choices=("fairness", "adaptive", "interactive"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchd-sched-") as d:
        tmp = Path(d)
        if args.only in (None, "fairness"):
            print_table("fairness: small batches beside a big one (16 slots, L = 0.2 s)",
                        ["batch", "creation to completed", "throughput", "target"],
                        fairness(tmp, args.quick))
        if args.only in (None, "adaptive"):
            print_table("adaptive concurrency against a server of capacity K (L = 0.1 s)",
                        ["K", "max_concurrency", "req/s", "/ best fixed", "429s", "target"],
                        adaptive(tmp, args.quick))
        if args.only in (None, "interactive"):
            print_table("interactive latency while an auto batch runs (K = 32, L = 0.1 s)",
                        ["K", "requests", "p50 s", "p95 s", "max s", "limit 2 L", "target"],
                        interactive(tmp, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
