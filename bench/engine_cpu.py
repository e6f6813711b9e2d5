"""Engine CPU per request: CPU seconds of a ``batchd worker`` process (the server runs with
``[engine] embedded = false``) divided by the requests it ran, against a fake upstream with
no latency. Baseline in the same run: the CPU seconds per request of the hand-written asyncio +
aiohttp client sending the same lines.

Run: ``python bench/engine_cpu.py [--quick] [--requests N]``. Target <= 100 us per request.
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

TARGET_US = 100.0


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--requests", type=int, default=20_000)
    args = p.parse_args()
    n = 500 if args.quick else args.requests
    data = chat_lines(n)
    with stack(workers=1, keep=args.keep) as s:
        baseline_run(s.upstream, chat_lines(200, prefix="warm"))
        batchd_run(s.client(), chat_lines(200, prefix="warm2"))
        cpu0 = time.process_time()
        base_s, base_ok = baseline_run(s.upstream, data)
        base_cpu = time.process_time() - cpu0
        pids = s.engine_pids()
        with Sampler(pids) as engine, Sampler([s.server.proc.proc.pid]) as api, profiled(
            args.profile, pids
        ):
            res = batchd_run(s.client(), data)
    base_us = base_cpu / n * 1e6
    eng_us = engine.cpu_seconds / n * 1e6
    api_us = api.cpu_seconds / n * 1e6
    print_table(
        f"engine CPU per request: {n} chat requests, no upstream latency",
        ["process", "requests", "wall s", "CPU s", "CPU us / request"],
        [
            ["hand-written aiohttp client (baseline)", base_ok, base_s, base_cpu, base_us],
            ["batchd worker (engine)", res.completed, res.seconds, engine.cpu_seconds, eng_us],
            ["batchd serve (API, embedded = false)", "", "", api.cpu_seconds, api_us],
        ],
    )
    print(f"\n**engine CPU per request = {eng_us:.0f} us** (target <= {TARGET_US:.0f} us: "
          f"{'met' if eng_us <= TARGET_US else 'not met'}); "
          f"ratio baseline/engine = {base_us / eng_us:.2f}")
    return 0 if res.completed == n and base_ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
