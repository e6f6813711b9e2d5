"""Benchmark of the embedded models through LocalBackend.send (no HTTP, no engine).

    python bench/local_model.py            # 32 concurrent chats x 32 tokens, 256 embeddings
    python bench/local_model.py --quick    # tiny sizes, < 60 s (CI)

Prints a markdown section: chat throughput with concurrent requests (continuous batching)
vs one request at a time in the same run, embeddings per second, and peak RSS with both
models loaded. The load average is printed too: on a shared 2-core machine other processes
change the figures a lot.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.backends.local import LocalBackend

TOPICS = [
    "the ocean", "a lighthouse", "autumn leaves", "a busy city", "the moon", "a small robot",
    "coffee", "mountains", "a library", "winter", "a train journey", "the desert", "music",
    "a garden", "rain", "a friendly dog", "the stars", "an old castle", "a river", "bread",
    "a volcano", "the forest", "a bicycle", "snow", "a market", "the sun", "a bridge",
    "clouds", "a violin", "the sea breeze", "a candle", "a kite",
]  # fmt: skip


@dataclass
class ChatRun:
    requests: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _chat_body(i: int, max_tokens: int) -> bytes:
    topic = TOPICS[i % len(TOPICS)]
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return orjson.dumps(body)


async def _chat(backend: LocalBackend, i: int, max_tokens: int) -> int:
    response = await backend.send("/v1/chat/completions", _chat_body(i, max_tokens), time_limit=600)
    answer: dict[str, Any] = orjson.loads(response.body)
    if response.status_code != 200:
        raise RuntimeError(answer)
    tokens: int = answer["usage"]["completion_tokens"]
    return tokens


async def chat_concurrent(backend: LocalBackend, n: int, max_tokens: int) -> ChatRun:
    start = time.perf_counter()
    counts = await asyncio.gather(*(_chat(backend, i, max_tokens) for i in range(n)))
    return ChatRun(n, sum(counts), time.perf_counter() - start)


async def chat_sequential(backend: LocalBackend, n: int, max_tokens: int) -> ChatRun:
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += await _chat(backend, i, max_tokens)
    return ChatRun(n, total, time.perf_counter() - start)


async def embeddings(backend: LocalBackend, n: int) -> tuple[float, float]:
    """Texts/s for n one-sentence requests sent concurrently, and for one n-input request."""
    texts = [f"Sentence number {i} about {TOPICS[i % len(TOPICS)]}." for i in range(n)]

    async def one(body: dict[str, Any]) -> None:
        response = await backend.send("/v1/embeddings", orjson.dumps(body), time_limit=600)
        if response.status_code != 200:
            raise RuntimeError(response.body)

    start = time.perf_counter()
    await asyncio.gather(*(one({"input": t}) for t in texts))
    concurrent = n / (time.perf_counter() - start)
    start = time.perf_counter()
    await one({"input": texts})
    single = n / (time.perf_counter() - start)
    return concurrent, single


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def main(quick: bool, blas_threads: int | None) -> str:
    n, max_tokens, sequential_n, n_texts = (4, 8, 1, 16) if quick else (32, 32, 8, 256)
    chat = LocalBackend("smollm2-135m-instruct", max_batch=max(n, 1), blas_threads=blas_threads)
    embed = LocalBackend("all-minilm-l6-v2", blas_threads=blas_threads)
    try:
        start = time.perf_counter()
        await _chat(chat, 0, 1)
        chat_load = time.perf_counter() - start
        start = time.perf_counter()
        await embed.send("/v1/embeddings", b'{"input": "warm up"}', time_limit=600)
        embed_load = time.perf_counter() - start
        await chat_concurrent(chat, min(n, 4), 2)  # warm the prefix cache and BLAS
        load_before = os.getloadavg()[0]
        batched = await chat_concurrent(chat, n, max_tokens)
        one_by_one = await chat_sequential(chat, sequential_n, max_tokens)
        emb_concurrent, emb_single = await embeddings(embed, n_texts)
        load_after = os.getloadavg()[0]
    finally:
        await chat.close()
        await embed.close()
    ratio = batched.tokens_per_s / one_by_one.tokens_per_s
    today = datetime.date.today().isoformat()
    cpus = os.cpu_count()
    flags = (" --quick" if quick else "") + (
        "" if blas_threads == 1 else f" --blas-threads {blas_threads or 0}"
    )
    threads = "numpy's default (one a core)" if blas_threads is None else f"{blas_threads}"
    return "\n".join(
        [
            f"### Embedded model ({'quick' if quick else 'full'} run, {today})",
            "",
            f"`python bench/local_model.py{flags}` on {cpus} CPU cores "
            f"({platform.machine()}, Python {platform.python_version()}), BLAS threads: "
            f"{threads}; load average {load_before:.1f} before / {load_after:.1f} after.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| model load, SmolLM2-135M (first request) | {chat_load:.1f} s |",
            f"| model load, all-MiniLM-L6-v2 (first request) | {embed_load:.1f} s |",
            f"| chat, {batched.requests} concurrent requests x {max_tokens} tokens | "
            f"{batched.tokens_per_s:.0f} tokens/s ({batched.tokens} tokens in "
            f"{batched.seconds:.1f} s) |",
            f"| chat, one request at a time ({one_by_one.requests} requests) | "
            f"{one_by_one.tokens_per_s:.0f} tokens/s |",
            f"| continuous batching speed-up | {ratio:.1f}x |",
            f"| embeddings, {n_texts} concurrent one-sentence requests | "
            f"{emb_concurrent:.0f} texts/s |",
            f"| embeddings, one request of {n_texts} sentences | {emb_single:.0f} texts/s |",
            f"| peak RSS, both models loaded | {_peak_rss_mb():.0f} MB |",
            "",
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    parser.add_argument(
        "--blas-threads", type=int, default=1, help="numpy BLAS threads (0: numpy's default)"
    )
    args = parser.parse_args()
    sys.stdout.write(asyncio.run(main(args.quick, args.blas_threads or None)))
