"""Engine CPU per request: CPU seconds of a ``batchd worker`` process (the server runs with
``[engine] embedded = false``) divided by the requests it ran, against a fake upstream with
no latency. Baseline in the same run: the CPU seconds per request of the hand-written asyncio +
aiohttp client sending the same lines.

With ``--content-filter annotate|block`` the engine runs with ``[content_filter]`` on (the
embedded classifier, in the worker process: its thread's CPU counts) and the prompts are
chat-sized sentences (the fake upstream echoes them, so each request has a prompt and an
answer of ~25 words to classify); the hand-written client does no filtering.

Run: ``python bench/engine_cpu.py [--quick] [--requests N] [--content-filter MODE]``.
Target <= 100 us per request (filtering off).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    MODEL,
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
# Chat-sized prompts for the content filter run (safe, as most traffic is).
SENTENCES = (
    "Can you summarise the main points of the quarterly report for the board meeting on Monday?",
    "Write a short product description for a stainless steel water bottle that keeps drinks cold.",
    "Explain how photosynthesis works in simple terms for a ten year old student, with an example.",
    "Draft a polite email to my landlord asking when the heating in the flat will be repaired.",
)


def sentence_lines(n: int) -> bytes:
    rows = []
    for i in range(n):
        text = f"{SENTENCES[i % len(SENTENCES)]} This is request {i}, thank you."
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        rows.append(msgspec.json.encode(
            {"custom_id": f"s-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        ))
    return b"\n".join(rows) + b"\n"


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument(
        "--content-filter",
        choices=("off", "annotate", "block"),
        default="off",
        help="run with [content_filter] on, embedded classifier, in this mode",
    )
    args = p.parse_args()
    n = 500 if args.quick else args.requests
    filtering = args.content_filter != "off"
    data = sentence_lines(n) if filtering else chat_lines(n)
    content_filter = {"enabled": True, "action": args.content_filter} if filtering else None
    with stack(workers=1, keep=args.keep, content_filter=content_filter) as s:
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
        f"engine CPU per request: {n} chat requests, no upstream latency, content filter "
        f"{args.content_filter}",
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
