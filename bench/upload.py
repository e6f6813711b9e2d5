"""Upload: a 200 MB, 100,000-line batch file, from the first byte of ``files.create`` to the
file's status ``processed`` (validated and cut into shards), in MB/s, with the server's peak
RSS sampled meanwhile. The server has an upstream deployment configured and no local model
loaded. Baseline in the same run: writing the same bytes to a file on the same disk and
decoding every line with msgspec (the two things an upload cannot avoid), in one process.

Run: ``python bench/upload.py [--quick] [--mb N]``. Targets: >= 200 MB/s, peak RSS <= 150 MB.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec

from common import Sampler, mb, parser, print_table, profiled, stack

TARGET_MBS = 200.0
TARGET_RSS_MB = 150.0


def make_file(total_bytes: int, lines: int) -> bytes:
    """``lines`` chat requests padded to about ``total_bytes`` in all."""
    per_line = total_bytes // lines
    head = json.dumps(
        {"custom_id": "req-0000000", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": ""}]}}
    )
    pad = "x" * max(0, per_line - len(head) - 1)
    rows = [
        json.dumps(
            {"custom_id": f"req-{i:07d}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": pad}]}}
        )
        for i in range(lines)
    ]
    return ("\n".join(rows) + "\n").encode()


def baseline(data: bytes, path: Path) -> float:
    t0 = time.perf_counter()
    with path.open("wb") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
        f.flush()
    decoder = msgspec.json.Decoder()
    for raw in data.split(b"\n"):
        if raw:
            decoder.decode(raw)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--mb", type=float, default=200.0, help="file size in MB (10^6 bytes)")
    p.add_argument("--lines", type=int, default=100_000)
    args = p.parse_args()
    size_mb, lines = (2.0, 1000) if args.quick else (args.mb, args.lines)
    data = make_file(int(size_mb * 1e6), lines)
    with stack(keep=args.keep) as s:
        base_s = baseline(data, s.tmp / "baseline.jsonl")
        client = s.client()
        client.files.list()  # warm the connection and the server's imports
        pid = s.server.proc.proc.pid
        idle_rss = Sampler([pid]).rss()
        with Sampler([pid], interval=0.005) as sampler, profiled(args.profile, [pid]):
            t0 = time.perf_counter()
            f = client.files.create(file=("big.jsonl", data), purpose="batch")
            t_stored = time.perf_counter()
            while f.status not in ("processed", "error"):
                time.sleep(0.01)
                f = client.files.retrieve(f.id)
            t_done = time.perf_counter()
    total = t_done - t0
    size = len(data)
    rate = mb(size) / total
    peak = mb(sampler.peak_rss)
    print_table(
        f"upload: {mb(size):.0f} MiB ({size / 1e6:.0f} MB), {lines:,} lines",
        ["step", "seconds", "MiB/s", "peak RSS (MiB)"],
        [
            ["baseline: write to disk + msgspec decode of every line", base_s,
             mb(size) / base_s, ""],
            ["batchd: files.create returned (bytes stored)", t_stored - t0,
             mb(size) / (t_stored - t0), ""],
            ["batchd: first byte to status processed", total, rate, peak],
        ],
    )
    print(f"\nserver RSS idle {mb(idle_rss):.0f} MiB, peak {peak:.0f} MiB; status {f.status}; "
          f"CPU {sampler.cpu_seconds:.2f} s")
    print(f"\n**{rate:.0f} MiB/s** (target >= {TARGET_MBS:.0f}: "
          f"{'met' if rate >= TARGET_MBS else 'not met'}); **peak RSS {peak:.0f} MiB** "
          f"(target <= {TARGET_RSS_MB:.0f}: {'met' if peak <= TARGET_RSS_MB else 'not met'}); "
          f"ratio baseline/batchd time = {base_s / total:.2f}")
    return 0 if f.status == "processed" else 1


if __name__ == "__main__":
    sys.exit(main())
