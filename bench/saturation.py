"""Saturation: the fake upstream answers after 0.1 s and the deployment allows
``max_concurrency = 64`` requests in flight, so no client can do better than 640 requests/s.
Ratio = batchd's achieved rate (while the batch runs: from ``in_progress`` to ``finalizing``,
from the server's own timestamps, and end to end) / that limit. The hand-written aiohttp client
at concurrency 64 runs the same lines in the same run, as the baseline.

Run: ``python bench/saturation.py [--quick] [--requests N]``. Target >= 0.95.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    baseline_run,
    batchd_run,
    chat_lines,
    parser,
    print_table,
    profiled,
    stack,
)

TARGET = 0.95
LATENCY = 0.1
CONCURRENCY = 64


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--requests", type=int, default=20_000)
    args = p.parse_args()
    n = 500 if args.quick else args.requests
    limit = CONCURRENCY / LATENCY
    data = chat_lines(n)
    with stack(latency=LATENCY, max_concurrency=CONCURRENCY, keep=args.keep) as s:
        base_s, base_ok = baseline_run(s.upstream, data, CONCURRENCY)
        s.upstream.reset()
        client = s.client()
        # A long-running service: the first batch after start-up pays ~0.4 s of one-time
        # imports and SQL compilation, which is not what this measures.
        batchd_run(client, chat_lines(64), poll=0.05)
        s.upstream.reset()
        with profiled(args.profile, [s.server.proc.proc.pid]):
            res = batchd_run(client, data, poll=0.1)
        created = res.wall[1]
        b = client.batches.retrieve(res.batch_id)
        stats = s.upstream.stats()
    run_s = (b.finalizing_at or b.completed_at or 0) - (b.in_progress_at or b.created_at)
    run_rate = n / run_s if run_s > 0 else float("nan")
    # The phase from batch creation to the status 'completed' seen by the poller.
    phase_rate = n / res.phases["run"]
    rows = [
        ["hand-written aiohttp client", n, base_s, n / base_s, (n / base_s) / limit],
        ["batchd, end to end (upload to download)", res.completed, res.seconds,
         n / res.seconds, (n / res.seconds) / limit],
        ["batchd, create to completed (poller)", res.completed, res.phases["run"],
         phase_rate, phase_rate / limit],
        ["batchd, in_progress_at to finalizing_at", res.completed, float(run_s), run_rate,
         run_rate / limit],
    ]
    print_table(
        f"saturation: {n} requests, upstream latency {LATENCY} s, max_concurrency "
        f"{CONCURRENCY} (limit {limit:.0f} req/s)",
        ["client", "requests", "seconds", "req/s", "achieved / limit"],
        rows,
    )
    ratio = phase_rate / limit
    ideal = n / limit
    print(
        f"\ntimeline (s): create to first upstream request {stats['first_at'] - created:.3f}; "
        f"first request to last answer {stats['last_at'] - stats['first_at']:.3f} "
        f"(ideal {ideal:.3f}); last answer to 'completed' seen "
        f"{res.wall[2] - stats['last_at']:.3f}"
    )
    print(f"\nupstream max in flight: {stats['max_in_flight']} (cap {CONCURRENCY}); "
          f"timestamps have 1 s resolution, so the in_progress-to-finalizing row is coarse")
    print(f"\n**ratio achieved/limit (create to completed) = {ratio:.3f}** (target >= {TARGET}: "
          f"{'met' if ratio >= TARGET else 'not met'}); baseline {(n / base_s) / limit:.3f}")
    return 0 if res.completed == n and base_ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
