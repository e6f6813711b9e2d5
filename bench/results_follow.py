"""Results while a batch runs: the latency from a result's arrival at the engine (the fake
upstream's answer time) to its line in a followed stream
(``GET /v1/batches/{id}/results?follow=true``), p50/p95 over every result of the batch.

Baseline in the same run: a client polling ``batches.retrieve`` every 20 ms, for which a
result is visible once ``completed + failed`` counts past its position (the line id tells the
position); both see a result only once it is committed, every ``engine.checkpoint_seconds``.
The ratio (stream / baseline) is what the follow loop adds on top of the commit.

Run: ``python bench/results_follow.py [--quick] [--lines N] [--latency S] [--concurrency K]``.
Target: p95 ratio <= 1.2.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx2
import orjson

from common import API_KEY, chat_lines, parser, print_table, stack

TARGET_P95_RATIO = 1.2
POLL_SECONDS = 0.02


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def follow(url: str, batch_id: str, seen: dict[str, tuple[float, int]]) -> None:
    """Read the followed stream; for each line, when it arrived (unix s) and its position."""
    head = "batch_req_" + batch_id.removeprefix("batch_") + "_"
    pending = b""
    with httpx2.stream(
        "GET",
        f"{url}/v1/batches/{batch_id}/results",
        params={"follow": "true"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=600,
    ) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_bytes():
            at = time.time()
            *whole, pending = (pending + chunk).split(b"\n")
            for line in whole:
                row = orjson.loads(line)
                seen[row["custom_id"]] = (at, int(row["id"].removeprefix(head)))


def poll_counts(client: Any, batch_id: str, out: list[tuple[float, int]], done: threading.Event
                ) -> None:  # fmt: skip
    """The baseline: (time, completed + failed) every 20 ms until ``done``."""
    while not done.is_set():
        b = client.batches.retrieve(batch_id)
        c = b.request_counts
        out.append((time.time(), c.completed + c.failed if c else 0))
        time.sleep(POLL_SECONDS)


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--lines", type=int, default=600)
    p.add_argument("--latency", type=float, default=0.1, help="fake upstream's seconds")
    p.add_argument("--concurrency", type=int, default=8, help="max_concurrency")
    args = p.parse_args()
    lines = 60 if args.quick else args.lines
    with stack(
        latency=args.latency, max_concurrency=args.concurrency, keep=args.keep
    ) as s:
        client = s.client()
        checkpoint = 0.5  # the default engine.checkpoint_seconds
        file = client.files.create(file=("in.jsonl", chat_lines(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        seen: dict[str, tuple[float, int]] = {}
        counts: list[tuple[float, int]] = []
        done = threading.Event()
        poller = threading.Thread(target=poll_counts, args=(client, batch.id, counts, done))
        poller.start()
        t0 = time.time()
        follow(s.server.url, batch.id, seen)
        wall = time.time() - t0
        time.sleep(0.2)
        done.set()
        poller.join()
        answered: dict[str, float] = s.upstream.stats()["answered_at"]
        status = client.batches.retrieve(batch.id).status
    assert status == "completed", status
    assert sorted(seen) == sorted(answered) and len(seen) == lines, "a result is missing"
    stream = [at - answered[cid] for cid, (at, _) in seen.items()]
    polled = []
    for cid, (_, pos) in seen.items():
        first = next((t for t, n in counts if n > pos), None)
        if first is not None:
            polled.append(first - answered[cid])
    p50, p95 = pct(stream, 0.5), pct(stream, 0.95)
    b50, b95 = pct(polled, 0.5), pct(polled, 0.95)
    ratio = p95 / b95
    headers = ["bench", "baseline: poll batches.retrieve every 20 ms", "followed stream",
               "ratio p50 / p95", "target", "met"]  # fmt: skip
    row = [
        f"{lines} results, upstream {args.latency * 1000:.0f} ms, max_concurrency "
        f"{args.concurrency}, checkpoint {checkpoint} s ({wall:.1f} s)",
        f"p50 {b50 * 1000:.0f} ms, p95 {b95 * 1000:.0f} ms ({len(polled)} results)",
        f"p50 **{p50 * 1000:.0f} ms**, p95 **{p95 * 1000:.0f} ms**",
        f"{p50 / b50:.2f} / {ratio:.2f}",
        f"p95 ratio <= {TARGET_P95_RATIO}",
        "yes" if ratio <= TARGET_P95_RATIO else "no",
    ]
    print_table("results follow: arrival to line", headers, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
