"""Token counting speed: how fast batchd counts a batch input's tokens with the model's
tokenizer (``batchd.tokens``), for the enqueued-token quotas.

Counts ``--lines`` chat requests (English prose, code and Japanese, rotating) for gpt-4o
(o200k_base) and gpt-4 (cl100k_base), one thread, and prints MB/s of input lines and lines/s.
Run: ``python bench/token_count.py``; the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time

from batchd.config import load_settings
from batchd.tokens import TokenCounter

TEXTS = [
    "The quarterly report shows revenue grew by twelve percent, driven by new customers in "
    "Europe and a steady renewal rate among existing accounts. " * 8,
    "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) if a[0] "
    "< b[0] else b.pop(0))\n    return out + a + b\n" * 6,
    "東京の天気は晴れのち曇り、午後から雨が降る見込みです。傘を持って出かけましょう。" * 10,
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=20000)
    args = p.parse_args()
    counter = TokenCounter(load_settings(None))
    for model in ("gpt-4o", "gpt-4"):
        lines = [
            json.dumps({
                "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "max_tokens": 100, "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": TEXTS[i % 3]},
                ]},
            }).encode()
            for i in range(args.lines)
        ]  # fmt: skip
        size = sum(len(x) + 1 for x in lines)
        counter.text_counter(model)  # load the encoding outside the timing
        t = time.perf_counter()
        tokens = counter.lines_tokens(lines)
        dt = time.perf_counter() - t
        print(
            f"{model}: {args.lines} lines, {size / 1e6:.1f} MB, {tokens} tokens "
            f"(bytes/4 would say {size // 4}): {size / 1e6 / dt:.1f} MB/s, "
            f"{args.lines / dt:,.0f} lines/s, one thread"
        )


if __name__ == "__main__":
    main()
