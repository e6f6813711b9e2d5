"""The ASGI application: ``create_app(settings, store, blobs)``.

Everything the handlers need is built here and kept on ``app.state``; nothing at import
time. Hooks (the embedded engine, for one) run inside the lifespan, so they start with the
server and stop with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.routing import APIRouter
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from batchd.api import docs, errors, messages, openapi
from batchd.api.auth import Authenticator
from batchd.api.bodyguard import BodyGuard
from batchd.api.local_guard import LocalGuard
from batchd.api.readiness import Readiness
from batchd.api.routes import GET, Services, build_router, json_response
from batchd.blobs.base import Blobs
from batchd.config import Settings
from batchd.service.activation import Activator
from batchd.service.batches import BatchService
from batchd.service.dashboard import DashboardService
from batchd.service.files import FileService
from batchd.service.idempotency import Idempotency
from batchd.service.message_batches import MessageBatchService
from batchd.service.results import ResultService
from batchd.service.retry import RetryService
from batchd.store.protocols import Store
from batchd.telemetry import exposition
from batchd.telemetry.metrics import Metrics
from batchd.tokens import InputCounter, TokenCounter
from batchd.ui.app import Dashboard
from batchd.ui.session import Sessions

log = logging.getLogger(__name__)

PREFIXES = ("/v1", "/openai", "/openai/v1")


def create_app(
    settings: Settings,
    store: Store,
    blobs: Blobs,
    *,
    owner: str,
    hooks: Sequence[contextlib.AbstractAsyncContextManager[Any]] = (),
    engine_process: Callable[[], dict[str, Any]] | None = None,
    wake_engine: Callable[[], None] | None = None,
) -> FastAPI:
    """``engine_process``: the state of ``batchd serve``'s embedded engine process, shown
    by ``/readyz``; ``wake_engine``: tells it a batch started (it claims at once)."""
    counter = InputCounter(TokenCounter(settings), blobs)
    activator = Activator(settings, store.files, store.batches, counter)
    metrics = Metrics()
    readiness = Readiness(store, engine_process)
    services = Services(
        files=FileService(settings, store.files, blobs, metrics),
        batches=BatchService(settings, store.batches, store.files, activator),
        auth=Authenticator(settings.auth),
        max_upload_bytes=settings.limits.max_file_bytes,
        readiness=readiness,
        wake_engine=wake_engine or (lambda: None),
        idempotency=Idempotency(store.keys),
        usage=store.usage,
        results=ResultService(
            store.batches,
            store.queue,
            blobs,
            keepalive_seconds=settings.limits.results_keepalive_seconds,
            streams=metrics.results_streams,
        ),
    )
    ready = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not services.auth.enabled:
            log.warning("no [auth] table: every request is accepted without a key (local use only)")
        async with contextlib.AsyncExitStack() as stack:
            for hook in hooks:
                await stack.enter_async_context(hook)
            await store.ping()
            ready.set()
            try:
                yield
            finally:
                ready.clear()

    app = FastAPI(
        title="batchd",
        summary="The OpenAI and Azure OpenAI Batch API, self-hosted",
        description=docs.DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    app.state.message_batches = MessageBatchService(
        settings, services.files, services.batches, store.message_batches, store.queue
    )
    errors.install(app)
    openapi.install(app)
    app.add_middleware(BodyGuard, timeout=settings.limits.body_timeout_seconds)
    if settings.auth is None:
        app.add_middleware(LocalGuard, allowed_hosts=settings.allowed_hosts)
    router = build_router()
    for prefix in PREFIXES:
        app.include_router(router, prefix=prefix, include_in_schema=prefix == "/v1")
    message_router = messages.build_router()
    app.include_router(message_router, prefix="/v1")
    docs.install(app, {route.path for route in router.routes if hasattr(route, "path")})
    dashboard = DashboardService(
        settings,
        store,
        blobs,
        files=services.files,
        batches=services.batches,
        retries=RetryService(services.files, services.batches, blobs),
        results=services.results,
        read_metrics=lambda: exposition.process_metrics(metrics.registry),
    )
    app.mount("/ui", Dashboard(dashboard, services.files, Sessions(services.auth)).app())

    @app.api_route("/", methods=GET, include_in_schema=False)
    @app.api_route("/ui", methods=GET, include_in_schema=False)
    async def to_dashboard() -> Response:
        return RedirectResponse("/ui/", status_code=307)

    @app.api_route("/metrics", methods=GET, include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus text format: this host's processes and the store's state."""
        state = await store.queue.queue_state(time.time())
        body = await anyio.to_thread.run_sync(
            exposition.render, metrics.registry, settings, state
        )
        return Response(body, media_type=exposition.CONTENT_TYPE)

    @app.api_route("/healthz", methods=GET, include_in_schema=False)
    async def healthz() -> Response:
        if not ready.is_set():
            return json_response({"status": "starting"}, 503)
        return json_response({"status": "ok"})

    @app.api_route("/readyz", methods=GET, include_in_schema=False)
    async def readyz() -> Response:
        ok, body = await readiness.check()
        return json_response(body, 200 if ok else 503)

    app.state.methods = _method_table(
        app, [*((prefix, router) for prefix in PREFIXES), ("/v1", message_router)]
    )
    return app


def _method_table(app: FastAPI, routers: Sequence[tuple[str, APIRouter]]) -> errors.MethodTable:
    """Every route's methods: each of ``routers`` under its prefix (the three trees and
    Anthropic's routes; the app's list of routes does not hold included routers' routes on
    every FastAPI release) and the app's own."""
    table = errors.MethodTable()
    routes = [(prefix, r) for prefix, included in routers for r in included.routes]
    for prefix, route in [*routes, *(("", r) for r in app.router.routes)]:
        if isinstance(route, Route) and route.methods:
            table.add(prefix + route.path, route.methods)
    return table
