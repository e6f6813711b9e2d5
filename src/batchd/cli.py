"""The ``batchd`` command: ``serve``, ``worker`` and ``migrate``; and the client commands
``submit``, ``ls``, ``show``, ``cancel``, ``results`` and ``retry`` (see ``client.py``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from types import FrameType
from typing import Any

from batchd import client
from batchd.config import Settings, load_settings
from batchd.errors import ConfigError, StoreError
from batchd.telemetry import logs, multiproc

log = logging.getLogger("batchd")


def _owner(role: str) -> str:
    return f"{socket.gethostname()}-{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = args.config or os.environ.get("BATCHD_CONFIG")
    return path


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(_config_path(args))
    logs.setup(settings)  # text or JSON lines, secrets scrubbed (telemetry/logs.py)
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
        log.info("deployment %s -> %s (max_concurrency %s)", d.model, where, d.max_concurrency)


async def _serve(settings: Settings, host: str, port: int, config: str | None) -> None:
    multiproc.use_directory(settings.data_dir / "metrics" / f"serve-{port}")  # before imports
    import uvicorn

    from batchd.api.app import create_app
    from batchd.api.http_protocol import BoundedHttpToolsProtocol

    owner = _owner("serve")
    store, blobs = await _open(settings)
    closed = False

    @contextlib.asynccontextmanager
    async def closing() -> AsyncIterator[None]:
        # Closed at the end of the lifespan (after the engine process stopped): uvicorn ends
        # by raising the signal it caught again, so nothing after serve() may be counted on.
        nonlocal closed
        try:
            yield
        finally:
            closed = True
            await blobs.close()
            await store.close()

    hooks: list[contextlib.AbstractAsyncContextManager[None]] = [closing()]
    engine = None
    if settings.engine.embedded:
        engine = EngineProcess(config)
        hooks.append(engine.running())
    else:
        log.info("[engine] embedded = false: this server runs no batches; start `batchd worker`")
    _describe(settings)
    app = create_app(
        settings,
        store,
        blobs,
        owner=owner,
        hooks=hooks,
        engine_process=engine.status if engine is not None else None,
        wake_engine=engine.wake if engine is not None else None,
    )
    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http=BoundedHttpToolsProtocol,
        ws="none",  # no WebSocket routes: don't load the websockets package (~0.5 MiB)
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        log_config=None,  # uvicorn's lines go through our handler (format, scrubbing)
        timeout_graceful_shutdown=10,
    )
    loop = asyncio.get_running_loop()
    results = app.state.services.results

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Followed results streams would hold the graceful shutdown up to its timeout:
            # end them first (their readers resume after the last line they got).
            loop.call_soon_threadsafe(results.close)
            if engine is not None:
                engine.shutting_down()
            super().handle_exit(sig, frame)

    try:
        await Server(server_config).serve()
    finally:
        if not closed:  # the lifespan never ran (the port was taken, say)
            await blobs.close()
            await store.close()


async def _worker(
    settings: Settings, parent: int | None = None, metrics_port: int | None = None
) -> None:
    owner = _owner("worker" if parent is None else "engine")
    store, blobs = await _open(settings)
    if parent is None:
        _describe(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watch = loop.create_task(_orphaned(parent)) if parent is not None else None
    watch_wake: asyncio.Task[None] | None = None
    try:
        engine = _engine(settings, store, blobs, owner)
        if metrics_port:
            from batchd.telemetry import exposition

            exposition.serve(metrics_port, engine.metrics.registry, settings)
        async with engine.running():
            if parent is not None:
                watch_wake = loop.create_task(_wakes(engine.wake))
            await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()
        if watch_wake is not None:
            watch_wake.cancel()
        await blobs.close()
        await store.close()


async def _wakes(wake: Callable[[], None]) -> None:
    """serve's API process writes a byte to the engine process's standard input when a
    batch starts, so that it is claimed at once rather than at the next poll."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        wake()


# -- the embedded engine's own process ---------------------------------------------------------
# ``batchd serve`` runs its embedded engine in a child process rather than on the API's event
# loop: a busy engine (thousands of responses a second) kept every API request waiting behind
# its callbacks and its GIL, and pushed poll latency to hundreds of milliseconds. The child is
# ``batchd worker`` in all but name; nothing the two need is shared in memory.
ENGINE_RESTART_SECONDS = 1.0
ENGINE_RESTART_MAX = 60.0
ENGINE_HEALTHY_SECONDS = 60.0  # a child that ran this long starts again after 1 s
ENGINE_NICENESS = 5


async def _orphaned(parent: int) -> None:
    """End the engine's process like ``kill -9`` when ``batchd serve`` is gone (the
    parent-death signal does it at once on Linux; this catches the rest)."""
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own arena; with the worker threads of file
    I/O and SQLite they hold on to tens of megabytes that a long batch leaves behind
    (measured: the engine's peak 174-202 MiB with the default, 148-150 MiB flat with 2). Must
    run before any thread starts; the environment's ``MALLOC_ARENA_MAX`` wins."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        m_arena_max = -8
        ctypes.CDLL(None).mallopt(m_arena_max, arenas)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class EngineProcess:
    """``batchd serve``'s embedded engine: a ``batchd worker`` child, started again when it
    dies, with a backoff (1 s doubling to 60 s; back to 1 s after it ran a minute). Its
    standard error passes through this process, which keeps the last error line it wrote
    for ``/readyz`` and the log. It reads the same configuration (file and environment)
    and skips the migrations the server has just run."""

    def __init__(self, config: str | None) -> None:
        self._cmd = [sys.executable, "-m", "batchd.cli", "worker", "--parent", str(os.getpid())]
        if config:
            self._cmd += ["--config", config]
        self._env = {**os.environ, "BATCHD_MIGRATE_ON_START": "false"}
        self._proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_error = ""
        self.next_start_at: float | None = None
        self._shutting_down = False

    def shutting_down(self) -> None:
        """The server is stopping: an exit of the engine from now on is expected (a Ctrl-C
        reaches the whole process group, the engine first), not restarted or logged as an
        error."""
        self._shutting_down = True

    def wake(self) -> None:
        """Tell the engine process there is new work (a byte on its standard input, read
        once it runs; none is lost while it starts): it claims at once."""
        proc = self._proc
        if proc is not None and proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                proc.stdin.write(b"w")

    def status(self) -> dict[str, Any]:
        alive = self._proc is not None and self._proc.returncode is None
        return {
            "alive": alive,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit,
            "last_error": self.last_error or None,
            "next_start_in_seconds": (
                None
                if alive or self.next_start_at is None
                else max(0.0, round(self.next_start_at - time.time(), 1))
            ),
        }

    async def _start(self) -> asyncio.subprocess.Process:
        self._proc = await asyncio.create_subprocess_exec(
            *self._cmd,
            env=self._env,
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return self._proc

    async def _relay(self, proc: asyncio.subprocess.Process) -> None:
        """Pass the child's standard error on, remembering its last error line."""
        assert proc.stderr is not None
        out = sys.stderr.buffer
        while line := await proc.stderr.readline():
            out.write(line)
            out.flush()
            text = line.decode("utf-8", "replace").strip()
            if logs.is_error_line(text) or "Error:" in text:
                self.last_error = text[-500:]

    async def _keep_running(self) -> None:
        delay = ENGINE_RESTART_SECONDS
        while True:
            started = time.monotonic()
            proc = await self._start()
            await self._relay(proc)
            code = await proc.wait()
            multiproc.mark_dead(proc.pid)
            self.last_exit = code
            if self._shutting_down:
                log.info("the engine process stopped (%s)", code)
                return
            if time.monotonic() - started > ENGINE_HEALTHY_SECONDS:
                delay = ENGINE_RESTART_SECONDS
            self.next_start_at = time.time() + delay
            log.error(
                "the engine process exited (%s); starting it again in %.0f s; last error: %s",
                code,
                delay,
                self.last_error or "none logged",
            )
            await asyncio.sleep(delay)
            self.restarts += 1
            delay = min(ENGINE_RESTART_MAX, delay * 2)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        monitor = asyncio.get_running_loop().create_task(self._keep_running())
        try:
            yield
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            proc = self._proc
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _migrate(settings: Settings) -> None:
    from batchd.store.connect import migrate

    await migrate(settings.resolved_database_url)
    log.info("schema is up to date")


async def _usage(settings: Settings, project: str | None) -> None:
    """Print the tokens per project and deployment (:mod:`batchd.store.usage`), one row each:
    enqueued (held by the quotas, with the limits) and used (input and output)."""
    from batchd.store.connect import migrate, open_store

    url = settings.resolved_database_url
    if settings.migrate_on_start:
        await migrate(url)
    store = open_store(url)
    try:
        rows = await store.usage.token_usage(project)
    finally:
        await store.close()
    head = ("PROJECT", "MODEL", "ENQUEUED", "LIMIT", "PROJECT LIMIT", "INPUT", "OUTPUT", "LIVE")
    table = [head]
    for r in rows:
        d = settings.deployment_for(r.model) if r.model else None
        limit = d.enqueued_token_limit if d is not None else 0
        table.append((
            r.project, r.model or "-", str(r.enqueued), str(limit or "-"),
            str(settings.project_token_limit(r.project) or "-"),
            str(r.input_tokens), str(r.output_tokens), str(r.unfinished),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


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
    p_worker.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # serve's own engine
    p_worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p_migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    p_migrate.add_argument("--config", help="TOML configuration file")
    p_usage = sub.add_parser(
        "usage", help="tokens per project and deployment: enqueued (quotas) and used"
    )
    p_usage.add_argument("--config", help="TOML configuration file")
    p_usage.add_argument("--project", help="only this project")
    client.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in client.COMMANDS:
        return client.run(args)
    limit_malloc_arenas()
    try:
        settings = _settings(args)
        if args.command == "serve":
            _run(_serve(settings, args.host, args.port, _config_path(args)))
        elif args.command == "worker":
            if args.parent:
                die_with_parent()
                # The engine is batch work: the API's polls get the CPU first when both want it.
                os.nice(ENGINE_NICENESS)
            _run(_worker(settings, args.parent, args.metrics_port))
        elif args.command == "usage":
            _run(_usage(settings, args.project))
        else:
            _run(_migrate(settings))
    except ConfigError as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return 2
    except (StoreError, OSError) as exc:
        # The database or the files cannot be reached at start-up: one line, not a traceback.
        where = "database_url" if isinstance(exc, StoreError) else "database_url/files_url"
        print(
            f"batchd: cannot start: {type(exc).__name__}: {exc} (check {where})", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        pass
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
