"""Overhead: N chat requests against a fake upstream with no latency, (a) sent by a hand-written
asyncio + aiohttp client at concurrency 64, (b) through batchd (upload, create, poll, download
with the openai SDK; deployment ``max_concurrency = 64``). Ratio = a's time / b's time.

Run: ``python bench/overhead.py [--quick] [--requests N] [--workers W]``. Target >= 0.9.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Sampler,
    baseline_run,
    batchd_run,
    chat_lines,
    parser,
    print_table,
    profiled,
    stack,
)

TARGET = 0.9


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=0, help="batchd worker processes (0: embedded)")
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    n = 500 if args.quick else args.requests
    data = chat_lines(n)
    with stack(max_concurrency=args.concurrency, workers=args.workers, keep=args.keep) as s:
        # Warm both paths (connections, imports, SQLite pages) with a small run each.
        baseline_run(s.upstream, chat_lines(200, prefix="warm"), args.concurrency)
        batchd_run(s.client(), chat_lines(200, prefix="warm2"))
        s.upstream.reset()
        up_pid = [s.upstream.proc.proc.pid]
        cpu0 = time.process_time()
        with Sampler(up_pid) as up_base:
            base_s, base_ok = baseline_run(s.upstream, data, args.concurrency)
        base_cpu = time.process_time() - cpu0
        s.upstream.reset()
        pids = [*s.engine_pids(), s.server.proc.proc.pid]
        with Sampler(up_pid) as up_b, Sampler(pids) as sampler, profiled(args.profile, pids):
            res = batchd_run(s.client(), data)
        stats = s.upstream.stats()
    dup = sum(1 for v in stats["answered"].values() if v > 1)
    ratio = base_s / res.seconds
    rows = [
        ["hand-written aiohttp client", n, base_s, n / base_s, base_ok, base_cpu,
         up_base.cpu_seconds, ""],
        [
            "batchd (upload+create+poll+download)",
            n,
            res.seconds,
            n / res.seconds,
            res.completed,
            sampler.cpu_seconds,
            up_b.cpu_seconds,
            f"{sampler.peak_rss / 2**20:.0f} MB",
        ],
    ]
    print_table(
        f"overhead: {n} chat requests, no upstream latency, concurrency {args.concurrency}",
        ["client", "requests", "seconds", "req/s", "ok", "client CPU s", "upstream CPU s",
         "batchd peak RSS"],
        rows,
    )
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in res.phases.items())
    print(f"\nbatchd phases: {phases}; upstream max in flight {stats['max_in_flight']}; "
          f"duplicates {dup}")
    print(f"\n**ratio (a/b) = {ratio:.2f}** (target >= {TARGET}: "
          f"{'met' if ratio >= TARGET else 'not met'})")
    if res.completed != n or base_ok != n:
        print(f"ERROR: expected {n} completed, got batchd {res.completed}, baseline {base_ok}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
