"""The ASGI application: ``create_app(settings, store, blobs)``.

Everything the handlers need is built here and kept on ``app.state``; nothing at import
time. Hooks (the embedded engine, for one) run inside the lifespan, so they start with the
server and stop with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.responses import Response

from batchd.api import errors, openapi
from batchd.api.auth import Authenticator
from batchd.api.bodyguard import BodyGuard
from batchd.api.readiness import Readiness
from batchd.api.routes import GET, Services, build_router, json_response
from batchd.blobs.base import Blobs
from batchd.config import Settings
from batchd.service.activation import Activator
from batchd.service.batches import BatchService
from batchd.service.files import FileService
from batchd.store.sql import Store

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
) -> FastAPI:
    """``engine_process``: the state of ``batchd serve``'s embedded engine process, shown
    by ``/readyz``."""
    activator = Activator(settings, store)
    readiness = Readiness(store, engine_process)
    services = Services(
        files=FileService(settings, store, blobs),
        batches=BatchService(settings, store, activator),
        auth=Authenticator(settings.auth),
        max_upload_bytes=settings.limits.max_file_bytes,
        readiness=readiness,
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
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.services = services
    errors.install(app)
    openapi.install(app)
    app.add_middleware(BodyGuard, timeout=settings.limits.body_timeout_seconds)
    router = build_router()
    methods = app.state.methods = errors.MethodTable()
    for prefix in PREFIXES:
        app.include_router(router, prefix=prefix, include_in_schema=prefix == "/v1")
        for route in router.routes:
            if isinstance(route, APIRoute):
                methods.add(prefix + route.path, route.methods or ())
    methods.add("/healthz", GET)
    methods.add("/readyz", GET)

    @app.api_route("/healthz", methods=GET, include_in_schema=False)
    async def healthz() -> Response:
        if not ready.is_set():
            return json_response({"status": "starting"}, 503)
        return json_response({"status": "ok"})

    @app.api_route("/readyz", methods=GET, include_in_schema=False)
    async def readyz() -> Response:
        ok, body = await readiness.check()
        return json_response(body, 200 if ok else 503)

    return app
