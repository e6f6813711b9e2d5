"""batchd beside LiteLLM: the same N chat lines against the same fake upstream (no latency), run
(a) by LiteLLM's async client, ``litellm.acompletion`` (model ``openai/gpt-4o``, ``api_base`` the
fake upstream, 64 requests in flight, one result line written per request), in a process of its
own started with LiteLLM's interpreter, and (b) through batchd end to end (upload, create, poll,
download with the openai SDK; deployment ``max_concurrency = 64``). Reports req/s, the peak RSS
of each side (LiteLLM's process; all of batchd's processes) and the ratios batchd/LiteLLM for
speed and LiteLLM/batchd for memory.

LiteLLM is not a dependency of batchd: install it in a virtualenv of its own and name that
interpreter with ``LITELLM_PYTHON`` (or ``--litellm-python``)::

    python3 -m venv <dir> && <dir>/bin/pip install litellm
    LITELLM_PYTHON=<dir>/bin/python python bench/litellm_compare.py

Without it the bench runs batchd alone and prints the LiteLLM figures cited in the performance
issue (measured elsewhere). LiteLLM is run offline (``LITELLM_LOCAL_MODEL_COST_MAP=True`` and
the other ``LITELLM_LOCAL_*`` switches): it must not fetch anything at run time.

Run: ``python bench/litellm_compare.py [--quick] [--requests N] [--litellm-python PATH]``.
Target (the issue): batchd >= 20x LiteLLM's req/s at <= 1/4 of its memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Sampler,
    batchd_run,
    chat_lines,
    mb,
    parser,
    print_table,
    profiled,
    stack,
)

SPEED_TARGET = 20.0
MEMORY_TARGET = 4.0
CITED = "133-157 req/s at ~800 MB RSS"  # the performance issue, measured elsewhere
CITED_RPS = (133.0, 157.0)
CITED_RSS_MB = 800.0

# Offline switches: LiteLLM otherwise fetches its model cost map and a few other tables.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
}

# Run by LiteLLM's interpreter: what a team would write with LiteLLM's async client to run a
# JSONL batch file against an OpenAI-compatible server. argv: api_base, input, output,
# concurrency, warm-up requests. Prints one JSON line with the timings.
_CHILD = r"""
import asyncio, importlib.metadata, io, json, resource, sys, time
t_start = time.perf_counter()
import litellm
t_imported = time.perf_counter()
litellm.suppress_debug_info = True
litellm.telemetry = False
api_base, src, dst, concurrency, warm = sys.argv[1:6]
concurrency, warm = int(concurrency), int(warm)

async def run(lines):
    queue = asyncio.Queue()
    for line in lines:
        queue.put_nowait(line)
    out = io.StringIO()
    ok = 0

    async def worker():
        nonlocal ok
        while not queue.empty():
            line = queue.get_nowait()
            body = dict(line["body"], model="openai/" + line["body"]["model"])
            try:
                resp = await litellm.acompletion(
                    **body, api_base=api_base, api_key="sk-fake", max_retries=0
                )
                ok += 1
                out.write(json.dumps({"custom_id": line["custom_id"],
                                      "response": resp.model_dump()}) + "\n")
            except Exception as e:
                out.write(json.dumps({"custom_id": line["custom_id"], "error": repr(e)}) + "\n")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, out.getvalue()

async def main():
    warm_lines = [{"custom_id": f"warm-{i}", "body": {"model": "gpt-4o", "messages": [
        {"role": "user", "content": f"warm-{i}"}]}} for i in range(warm)]
    await run(warm_lines)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with open(src) as f:
        lines = [json.loads(raw) for raw in f if raw.strip()]
    ok, text = await run(lines)
    with open(dst, "w") as f:
        f.write(text)
    return ok, time.perf_counter() - t0, time.process_time() - cpu0

try:
    import uvloop
    loop_name = "uvloop"
    ok, seconds, cpu = uvloop.run(main())
except ImportError:
    loop_name = "asyncio"
    ok, seconds, cpu = asyncio.run(main())
print(json.dumps({
    "version": importlib.metadata.version("litellm"),
    "loop": loop_name, "ok": ok, "seconds": seconds, "cpu_s": cpu,
    "import_s": t_imported - t_start, "total_s": time.perf_counter() - t_start,
    "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""


def litellm_python(arg: str | None) -> str | None:
    """The interpreter that has LiteLLM: ``--litellm-python``, else ``LITELLM_PYTHON``."""
    py = arg or os.environ.get("LITELLM_PYTHON")
    if not py:
        return None
    if not Path(py).exists():
        print(f"LiteLLM interpreter {py} does not exist", file=sys.stderr)
        return None
    return py


def litellm_run(
    py: str, api_base: str, data: bytes, tmp: Path, concurrency: int, warm: int
) -> tuple[dict, int]:
    """Run the LiteLLM client in its own process; its report and its peak RSS (sampled)."""
    src, dst = tmp / "litellm-in.jsonl", tmp / "litellm-out.jsonl"
    src.write_bytes(data)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(LITELLM_ENV)
    cmd = [py, "-c", _CHILD, api_base, str(src), str(dst), str(concurrency), str(warm)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp, text=True
    )
    with Sampler([proc.pid], interval=0.01) as sampler:
        out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"LiteLLM run failed ({proc.returncode}):\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    return report, max(sampler.peak_rss, int(report["maxrss"]))


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument(
        "--litellm-python",
        metavar="PATH",
        help="Python interpreter with litellm installed (default: $LITELLM_PYTHON)",
    )
    args = p.parse_args()
    n = 500 if args.quick else args.requests
    warm = 50 if args.quick else 200
    data = chat_lines(n)
    py = litellm_python(args.litellm_python)
    if py is None:
        print(
            "LiteLLM is not installed for this bench: running batchd only.\n"
            "To compare, install it in a virtualenv of its own and name its interpreter:\n"
            "  python3 -m venv <dir> && <dir>/bin/pip install litellm\n"
            "  LITELLM_PYTHON=<dir>/bin/python python bench/litellm_compare.py",
            file=sys.stderr,
        )
    load0 = os.getloadavg()
    lite: dict | None = None
    lite_rss = 0
    with stack(max_concurrency=args.concurrency, keep=args.keep) as s:
        batchd_run(s.client(), chat_lines(warm, prefix="warm2"))
        s.upstream.reset()
        if py is not None:
            lite, lite_rss = litellm_run(py, s.upstream.v1, data, s.tmp, args.concurrency, warm)
            lite_stats = s.upstream.stats()
            s.upstream.reset()
        pids = [*s.engine_pids(), s.server.proc.proc.pid]
        with Sampler(pids) as sampler, profiled(args.profile, pids):
            res = batchd_run(s.client(), data)
    load1 = os.getloadavg()
    batchd_rps = n / res.seconds
    rows = []
    if lite is not None:
        lite_rps = n / lite["seconds"]
        rows.append([
            f"LiteLLM {lite['version']} `acompletion`, {args.concurrency} in flight "
            f"({lite['loop']})", n, lite["seconds"], lite_rps, lite["ok"],
            lite["cpu_s"] * 1e6 / n, f"{mb(lite_rss):.0f} MB",
        ])
    else:
        rows.append([f"LiteLLM batch execution (cited: {CITED}, measured elsewhere)", n, "", "",
                     "", "", f"~{CITED_RSS_MB:.0f} MB"])
    rows.append([
        "batchd (upload+create+poll+download)", n, res.seconds, batchd_rps, res.completed,
        sampler.cpu_seconds * 1e6 / n, f"{mb(sampler.peak_rss):.0f} MB",
    ])
    print_table(
        f"batchd beside LiteLLM: {n} chat requests, no upstream latency, "
        f"concurrency {args.concurrency}",
        ["client", "requests", "seconds", "req/s", "ok", "CPU µs/request",
         "peak RSS (all processes)"],
        rows,
    )
    print(f"\nload average before {load0[0]:.2f}, after {load1[0]:.2f} ({os.cpu_count()} cores)")
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in res.phases.items())
    print(f"batchd phases: {phases}")
    if lite is not None:
        speed = batchd_rps / lite_rps
        memory = lite_rss / sampler.peak_rss
        print(f"LiteLLM process: interpreter start + `import litellm` {lite['import_s']:.2f} s "
              f"(not in its seconds or CPU), whole process {lite['total_s']:.2f} s; "
              f"upstream max in flight {lite_stats['max_in_flight']}")
        met = speed >= SPEED_TARGET and memory >= MEMORY_TARGET
        print(f"\n**speed batchd/LiteLLM = {speed:.2f}x, memory LiteLLM/batchd = {memory:.2f}x** "
              f"(issue's target >= {SPEED_TARGET:.0f}x and >= {MEMORY_TARGET:.0f}x: "
              f"{'met' if met else 'not met'} against this LiteLLM client)")
    else:
        lo, hi = (batchd_rps / r for r in reversed(CITED_RPS))
        memory = CITED_RSS_MB / mb(sampler.peak_rss)
        print(f"\nagainst the cited figures ({CITED}, measured elsewhere): speed "
              f"{lo:.1f}-{hi:.1f}x, memory {memory:.2f}x")
    failed = res.completed != n or (lite is not None and lite["ok"] != n)
    if failed:
        print(f"ERROR: expected {n} ok, got batchd {res.completed}"
              + (f", LiteLLM {lite['ok']}" if lite is not None else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
