"""``GET /readyz``: is this server able to get batches done? (DESIGN.md's fixed interface)

Ready (200) when the store answers within :data:`STORE_TIMEOUT` and at least one engine is
alive: an engine renews its deployment-slot leases every second or so, so the store knows
every live engine of the cluster (the embedded one, or ``batchd worker`` processes). Not
ready (503) otherwise, with the reason; batches created meanwhile are queued, not lost.

Body: ``{"status": "ready"|"not_ready", "store": "ok"|"<error>", "engines": N,
"engine_process": {...}}`` (the last only when ``batchd serve`` runs an embedded engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from batchd.store.protocols import Store

log = logging.getLogger(__name__)

STORE_TIMEOUT = 2.0
WARN_EVERY = 30.0  # seconds between two "no engine" warnings in the log


class Readiness:
    def __init__(
        self, store: Store, engine_process: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self._store = store
        self._engine_process = engine_process
        self._warned_at = 0.0

    async def check(self) -> tuple[bool, dict[str, Any]]:
        body: dict[str, Any] = {"status": "not_ready", "store": "ok", "engines": 0}
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                await self._store.ping()
                body["engines"] = await self._store.slots.live_engines(time.time())
        except Exception as exc:
            body["store"] = f"unreachable: {type(exc).__name__}"
        if self._engine_process is not None:
            body["engine_process"] = self._engine_process()
        ok = body["store"] == "ok" and body["engines"] > 0
        if ok:
            body["status"] = "ready"
        return ok, body

    async def note_queued(self, batch_id: str) -> None:
        """Log why a new batch waits when no engine is alive to run it (at most every 30 s)."""
        if time.time() - self._warned_at < WARN_EVERY:
            return
        ok, body = await self.check()
        if ok:
            return
        self._warned_at = time.time()
        why = body.get("engine_process", {}).get("last_error") or "no `batchd worker` is running"
        log.warning(
            "batch %s is queued: no engine is alive to run it (store: %s; %s)",
            batch_id,
            body["store"],
            why,
        )
