"""Scale-out: 1, 2 and 4 ``batchd worker`` processes on one PostgreSQL database against a fake
upstream with 0.1 s latency and no cap of its own. Reports req/s for each, the ratio to the
deployment's limit (``max_concurrency / latency``), and the PostgreSQL round trips the workers
made per 1,000 requests (statements + BEGIN + COMMIT, counted in each worker process with
SQLAlchemy events: the server here has no pg_stat_statements).

Run: ``python bench/scale_out.py [--quick] [--requests N]``. Needs PostgreSQL on
127.0.0.1:5432 (``BATCHD_TEST_PG`` to change). Writes nothing; paste the table into
``docs/benchmarks.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from openai import OpenAI  # noqa: E402
from tests.support import (  # noqa: E402
    Proc,
    pg_admin,
    pg_url,
    spawn,
    start_server,
    start_upstream,
    write_config,
)

from common import API_KEY, batchd_run, chat_lines, parser, print_table  # noqa: E402

LATENCY = 0.1
LIMIT = 64


# -- the worker, with its database round trips counted ------------------------------------
def count_worker(config: str, counts_path: str) -> None:
    """``batchd worker`` with a counter of what it sends to the database."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine as SyncEngine

    from batchd.backends.registry import build_backend
    from batchd.blobs.factory import open_blobs
    from batchd.config import load_settings
    from batchd.engine.worker import Engine
    from batchd.store.connect import open_store

    counts: Counter[str] = Counter()
    event.listen(SyncEngine, "before_cursor_execute",
                 lambda *a: counts.update([a[2].split(None, 1)[0].upper()]))
    event.listen(SyncEngine, "begin", lambda *a: counts.update(["BEGIN"]))
    event.listen(SyncEngine, "commit", lambda *a: counts.update(["COMMIT"]))
    event.listen(SyncEngine, "rollback", lambda *a: counts.update(["ROLLBACK"]))

    async def main() -> None:
        settings = load_settings(config)
        store, blobs = open_store(settings.resolved_database_url), open_blobs(settings)
        backends = {d.model: build_backend(d) for d in settings.effective_deployments()}
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        engine = Engine(settings, store, blobs, backends, owner=f"bench-{uuid.uuid4().hex[:8]}")
        async with engine.running():
            await stop.wait()
        await store.close()

    import uvloop

    uvloop.run(main())
    Path(counts_path).write_text(json.dumps(counts))


# -- the measurement ---------------------------------------------------------------------------
def wait_registered(db: str, workers: int, timeout: float = 60) -> None:
    """Each worker leases its deployment slots as it starts: wait until all have."""
    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(pg_url(db))
        try:
            return int(await conn.fetchval("SELECT count(DISTINCT owner) FROM deployment_slots"))
        finally:
            await conn.close()

    deadline = time.time() + timeout
    while asyncio.run(count()) < workers:
        if time.time() > deadline:
            raise TimeoutError("the workers did not start")
        time.sleep(0.2)


@contextlib.contextmanager
def cluster(tmp: Path) -> Iterator[tuple[Path, OpenAI, str]]:
    """One database, one fake upstream, one API replica; workers come and go per run."""
    db = f"batchd_bench_{uuid.uuid4().hex[:8]}"
    pg_admin(f'CREATE DATABASE "{db}"')
    upstream = start_upstream(tmp, latency=LATENCY)
    server = None
    try:
        cfg = write_config(tmp, {
            "data_dir": str(tmp / "data"),
            "database_url": pg_url(db),
            "auth": {"keys": {API_KEY: "bench"}},
            "deployments": [{"model": "gpt-4o", "base_url": upstream.v1,
                             "max_concurrency": LIMIT}],
            "engine": {"embedded": False, "shard_lines": 100, "max_shards": 8},
        }, "scale-out.toml")
        server = start_server(cfg, tmp)  # migrates the database
        yield cfg, OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0), db
    finally:
        if server is not None:
            server.proc.stop()
        upstream.proc.stop()
        pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def one_run(tmp: Path, cfg: Path, client: OpenAI, db: str, workers: int, n: int) -> dict[str, Any]:
    procs: list[Proc] = []
    count_files = [tmp / f"counts-{workers}-{i}.json" for i in range(workers)]
    try:
        for i, path in enumerate(count_files):
            procs.append(spawn([sys.executable, __file__, "--count-worker", str(cfg), str(path)],
                               tmp / f"bench-worker-{workers}-{i}.log"))
        wait_registered(db, workers)
        result = batchd_run(client, chat_lines(n, prefix=f"w{workers}"))
    finally:
        for p in procs:  # SIGTERM: each worker writes its counts and releases its slots
            p.proc.terminate()
        for p in procs:
            p.stop()
    counts: Counter[str] = Counter()
    for path in count_files:
        counts.update(json.loads(path.read_text()))
    run_s = result.phases["run"]
    return {
        "workers": workers,
        "completed": result.completed,
        "run_s": run_s,
        "rps": result.completed / run_s,
        "ratio": result.completed / run_s / (LIMIT / LATENCY),
        "round_trips_per_1000": 1000 * sum(counts.values()) / max(1, result.completed),
        "by_kind": dict(counts.most_common()),
    }


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=0)
    args = p.parse_args()
    n = args.requests or (1000 if args.quick else 6000)
    rows = []
    details = []
    with tempfile.TemporaryDirectory(prefix="batchd-scale-") as tmp, cluster(Path(tmp)) as (
        cfg,
        client,
        db,
    ):
        for workers in (1, 2, 4):
            r = one_run(Path(tmp), cfg, client, db, workers, n)
            assert r["completed"] == n, r
            rows.append([r["workers"], n, r["run_s"], r["rps"], r["ratio"],
                         r["round_trips_per_1000"]])
            details.append(r)
    print_table(
        f"Scale-out: {n} requests, upstream latency {LATENCY}s, max_concurrency {LIMIT} "
        f"(limit {LIMIT / LATENCY:.0f} req/s)",
        ["workers", "requests", "run s", "req/s", "ratio to limit", "PG round trips / 1000 req"],
        rows,
    )
    for r in details:
        print(f"\nworkers={r['workers']}: statements by kind {r['by_kind']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--count-worker":
        count_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
