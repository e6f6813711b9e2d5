"""Memory of ``batchd serve`` as a new user runs it: no configuration, the embedded models.

    python bench/serve_memory.py            # 32 chat requests x 32 tokens, 256 embeddings
    python bench/serve_memory.py --quick    # 4 and 16, 1 s to settle (checks that it runs)

Starts ``batchd serve`` with no config (SQLite, local files, the embedded models) on a free
port and reports the RSS of its process tree (the API process, the engine process and any
other child), summed as ``ps``/``top`` show it:

1. idle, 3 s after ``/healthz`` answers (no model loaded yet: they load on first use);
2. after a chat batch on ``smollm2-135m-instruct`` and an embeddings batch on
   ``all-minilm-l6-v2``, sent with the ``openai`` SDK, 3 s after both ended (both models
   loaded and kept), with the peak sampled every 20 ms while they ran.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from openai import OpenAI
from tests.support import start_server, wait_batch, write_config

from common import Sampler, machine, now_utc, parser

SETTLE_SECONDS = 3.0


def _tree(pid: int) -> list[tuple[str, int]]:
    """(role, RSS) of the server and each of its children."""
    root = psutil.Process(pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        cmd = " ".join(p.cmdline())
        role = "engine" if " worker " in f"{cmd} " else "API" if p.pid == pid else "other"
        out.append((role, p.memory_info().rss))
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _describe(pid: int) -> str:
    parts = _tree(pid)
    total = sum(rss for _, rss in parts)
    each = ", ".join(f"{role} {_mib(rss)}" for role, rss in parts)
    return f"**{_mib(total)}** ({each})"


def _batch(client: OpenAI, rows: list[dict[str, object]], endpoint: str) -> None:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    file = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")
    done = wait_batch(client, batch.id, timeout=1800)
    counts = done.request_counts
    assert done.status == "completed" and counts is not None and counts.failed == 0, done


def main() -> int:
    args = parser(__doc__ or "").parse_args()
    chats, embeddings = (4, 16) if args.quick else (32, 256)
    settle = 1.0 if args.quick else SETTLE_SECONDS
    tmp = Path(tempfile.mkdtemp(prefix="batchd-memory-"))
    server = start_server(write_config(tmp, {"log_level": "warning"}), tmp)
    pid = server.proc.proc.pid
    try:
        time.sleep(settle)
        idle = _describe(pid)
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        chat = [
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "smollm2-135m-instruct",
                    "messages": [{"role": "user", "content": f"Write a story about topic {i}."}],
                    "max_tokens": 32,
                },
            }
            for i in range(chats)
        ]
        embed = [
            {
                "custom_id": f"e{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "all-minilm-l6-v2", "input": f"sentence number {i} " * 8},
            }
            for i in range(embeddings)
        ]
        start = time.perf_counter()
        with Sampler([pid]) as sampler:
            _batch(client, chat, "/v1/chat/completions")
            _batch(client, embed, "/v1/embeddings")
        seconds = time.perf_counter() - start
        time.sleep(settle)
        loaded = _describe(pid)
        client.close()
    finally:
        server.proc.stop()
    print(f"### `batchd serve` memory, no config ({now_utc()}; {machine()})\n")
    print("| state | RSS of the process tree |\n|---|---|")
    print(f"| idle, {settle:.0f} s after start (no model loaded) | {idle} |")
    print(
        f"| after {chats} chat + {embeddings} embedding requests ({seconds:.0f} s), "
        f"both models loaded | {loaded} |"
    )
    print(f"| peak while they ran | {_mib(sampler.peak_rss)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
