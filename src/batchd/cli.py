"""The ``batchd`` command: ``serve``, ``worker`` and ``migrate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from batchd.config import Settings, load_settings
from batchd.errors import ConfigError

log = logging.getLogger("batchd")


def _owner(role: str) -> str:
    return f"{socket.gethostname()}-{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or os.environ.get("BATCHD_CONFIG")
    settings = load_settings(path)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return settings


async def _open(settings: Settings) -> tuple[Any, Any]:
    from batchd.blobs.factory import open_blobs
    from batchd.store.connect import migrate, open_store

    if settings.migrate_on_start:
        await migrate(settings.resolved_database_url)
    return open_store(settings.resolved_database_url), open_blobs(settings)


def _engine(settings: Settings, store: Any, blobs: Any, owner: str) -> Any:
    from batchd.backends.registry import build_backend
    from batchd.engine.worker import Engine

    backends = {d.model: build_backend(d) for d in settings.effective_deployments()}
    return Engine(settings, store, blobs, backends, owner=owner)


def _describe(settings: Settings) -> None:
    for d in settings.effective_deployments():
        where = d.base_url if d.backend == "openai" else f"embedded model {d.local_model}"
        log.info("deployment %s -> %s (max_concurrency %d)", d.model, where, d.max_concurrency)


async def _serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from batchd.api.app import create_app

    owner = _owner("serve")
    store, blobs = await _open(settings)
    hooks = []
    if settings.engine.embedded:
        hooks.append(_engine(settings, store, blobs, owner).running())
    else:
        log.info("[engine] embedded = false: this server runs no batches; start `batchd worker`")
    _describe(settings)
    app = create_app(settings, store, blobs, owner=owner, hooks=hooks)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await blobs.close()
        await store.close()


async def _worker(settings: Settings) -> None:
    owner = _owner("worker")
    store, blobs = await _open(settings)
    _describe(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with _engine(settings, store, blobs, owner).running():
            await stop.wait()
    finally:
        await blobs.close()
        await store.close()


async def _migrate(settings: Settings) -> None:
    from batchd.store.connect import migrate

    await migrate(settings.resolved_database_url)
    log.info("schema is up to date")


def _run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the HTTP API (and the engine, unless disabled)")
    p_serve.add_argument("--config", help="TOML configuration file")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_worker = sub.add_parser("worker", help="run the engine only (add as many as needed)")
    p_worker.add_argument("--config", help="TOML configuration file")
    p_migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    p_migrate.add_argument("--config", help="TOML configuration file")
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "serve":
            _run(_serve(settings, args.host, args.port))
        elif args.command == "worker":
            _run(_worker(settings))
        else:
            _run(_migrate(settings))
    except ConfigError as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
