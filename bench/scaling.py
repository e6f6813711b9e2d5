"""Scaling: requests/s and peak RSS of ``batchd serve`` (API and embedded engine, all its
processes) for batches of 1k, 10k and 100k lines against a fake upstream with no latency; the
hand-written aiohttp client runs the same lines in the same run as the baseline. Cost should
grow linearly (flat req/s) and memory stay flat. A 200-line batch runs first (not
measured): the first batch after start-up pays one-time costs.

Run: ``python bench/scaling.py [--quick] [--sizes 1000,10000,100000]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Sampler, baseline_run, batchd_run, chat_lines, mb, parser, print_table, stack


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--sizes", default="1000,10000,100000")
    args = p.parse_args()
    sizes = [100, 300, 1000] if args.quick else [int(x) for x in args.sizes.split(",")]
    rows = []
    ok = True
    with stack(keep=args.keep) as s:
        pid = s.server.proc.proc.pid
        idle = Sampler([pid]).rss()
        # The first batch after start-up pays one-time costs (imports, SQL statements compiled
        # on first use: ~0.3 s of CPU); one small batch first, so each size measures a batch.
        baseline_run(s.upstream, chat_lines(200, prefix="warm"))
        batchd_run(s.client(), chat_lines(200, prefix="warm"), poll=0.1)
        for n in sizes:
            data = chat_lines(n, prefix=f"n{n}")
            base_s, base_ok = baseline_run(s.upstream, data)
            with Sampler([pid]) as sampler:
                res = batchd_run(s.client(), data, poll=0.1)
            ok = ok and res.completed == n and base_ok == n
            rows.append([n, n / base_s, n / res.seconds, base_s / res.seconds,
                         sampler.cpu_seconds / n * 1e6, mb(sampler.peak_rss)])
    print_table(
        "scaling: batch size against requests/s and memory (upstream latency 0)",
        ["lines", "baseline req/s", "batchd req/s", "ratio", "batchd CPU us/req",
         "batchd peak RSS MiB"],
        rows,
    )
    print(f"\nserve idle RSS (all processes) {mb(idle):.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
