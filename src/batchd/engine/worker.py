"""The engine: claims shards, runs them, keeps their leases, watches for cancel and expiry,
finalises batches, and sweeps up after crashed processes.

``Engine(settings, store, blobs, backends)`` runs inside ``batchd serve`` (unless
``[engine] embedded = false``) and is all of ``batchd worker``. Any number of engines share
one store; nothing one needs lives in another's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from batchd.backends.base import Backend
from batchd.blobs.base import Blobs
from batchd.config import Settings
from batchd.engine.checkpoints import Checkpointer
from batchd.engine.finalize import Finalizer
from batchd.engine.limits import DeploymentLimiter
from batchd.engine.shard import Route, ShardRun
from batchd.engine.slots import SlotLeaser
from batchd.engine.webhooks import WebhookSender
from batchd.errors import LeaseLost
from batchd.models import CANCELLING, new_id, now
from batchd.service.activation import Activator
from batchd.service.files import FileService
from batchd.store.sql import Store

log = logging.getLogger(__name__)

SIGNAL_SECONDS = 0.5
SWEEP_SECONDS = 2.0
FINALIZE_LEASE = 120.0
BUSY_POLL_FACTOR = 4


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        blobs: Blobs,
        backends: dict[str, Backend],
        *,
        owner: str,
    ) -> None:
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._backends = backends
        self.owner = owner
        self._cfg = settings.engine
        self._spool = Path(settings.data_dir) / "spool"
        # Limiters start with no slots: the first lease (at start) gives each its share.
        self._routes = {
            d.model: Route(backends[d.model], DeploymentLimiter(d, capacity=0), d.timeout)
            for d in settings.effective_deployments()
            if d.model in backends
        }
        self.slots = SlotLeaser(
            store, owner, [r.limiter for r in self._routes.values()], self._cfg.lease_seconds
        )
        self._runs: dict[tuple[str, int], ShardRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._shard_ended = asyncio.Event()
        # One checkpoint transaction per interval for every shard this engine runs.
        self.checkpointer = Checkpointer(store, self._cfg.checkpoint_seconds)
        self._finalizer = Finalizer(store, blobs, self._spool, owner)
        activator = Activator(settings, store)
        self._activator = activator
        self._files = FileService(settings, store, blobs)
        self._webhooks = WebhookSender(settings.webhooks, store) if settings.webhooks else None

    # -- lifecycle ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        await self.slots.renew()
        # Everything built so far (modules, settings, the store's engines) lives as long as
        # the process: out of the collector's sight, a collection of the oldest generation
        # scans only what the engine made since (about 5% of its CPU otherwise).
        gc.collect()
        gc.freeze()
        loops = [
            self.slots.run(),
            self._claim_loop(),
            self._heartbeat_loop(),
            self._signal_loop(),
            self._finalize_loop(),
            self._sweep_loop(),
        ]
        tasks = [asyncio.get_running_loop().create_task(c) for c in loops]
        log.info("engine %s started", self.owner)
        try:
            yield self
        finally:
            for t in tasks:
                t.cancel()
            for run in self._runs.values():
                run.request_stop("batch_cancelled")
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
            await self.checkpointer.close()
            await self.slots.release()
            for backend in self._backends.values():
                await backend.close()
            if self._webhooks is not None:
                await self._webhooks.close()
            log.info("engine %s stopped", self.owner)

    # -- claiming and running shards -------------------------------------------------------
    async def _claim_loop(self) -> None:
        while True:
            free = self._cfg.max_shards - len(self._runs)
            claims = []
            if free > 0:
                try:
                    claims = await self._store.claim_shards(
                        self.owner, free, time.time(), self._cfg.lease_seconds
                    )
                except Exception:
                    log.exception("claiming shards failed")
            for claim in claims:
                run = ShardRun(
                    claim=claim,
                    store=self._store,
                    blobs=self._blobs,
                    spool=self._spool,
                    routes=self._routes,
                    checkpoint_seconds=self._cfg.checkpoint_seconds,
                    cancel_grace=self._cfg.cancel_grace_seconds,
                    checkpointer=self.checkpointer,
                )
                self._runs[run.key] = run
                self._spawn(self._run_shard(run))
            if not claims:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_wait())

    async def _run_shard(self, run: ShardRun) -> None:
        try:
            await run.run()
        except LeaseLost:
            log.warning("shard %s/%d: lease lost to another worker", *run.key)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("shard %s/%d failed; it will be claimed again", *run.key)
        finally:
            self._runs.pop(run.key, None)
            self._wake.set()
            self._shard_ended.set()

    def _idle_wait(self) -> float:
        """How long the claim and finalise loops wait when they found nothing: ``poll_seconds``,
        or ``BUSY_POLL_FACTOR`` times that while this engine runs shards. Both loops are woken
        at once when one of its shards ends (which frees a place and may finish a batch), so
        the slower poll only delays work that other processes leave."""
        if self._runs:
            return self._cfg.poll_seconds * BUSY_POLL_FACTOR
        return self._cfg.poll_seconds

    def _spawn(self, coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.lease_seconds / 3)
            held = [
                (r.claim.batch_id, r.claim.idx, r.claim.token)
                for r in self._runs.values()
                if not r.released  # done and stored: no lease left to renew
            ]
            if not held:
                continue
            try:
                lost = await self._store.renew_leases(
                    self.owner, held, time.time() + self._cfg.lease_seconds
                )
            except Exception:
                log.exception("renewing leases failed")
                continue
            for key in lost:
                run = self._runs.get(key)
                if run is not None:
                    log.warning("shard %s/%d: lease lost", *key)
                    run.lost = True
                    run.request_stop("batch_cancelled")

    async def _signal_loop(self) -> None:
        """Cancel and expiry reach every running shard within half a second."""
        while True:
            await asyncio.sleep(SIGNAL_SECONDS)
            if not self._runs:
                continue
            try:
                signals = await self._store.signals(r.claim.batch_id for r in self._runs.values())
            except Exception:
                log.exception("reading batch signals failed")
                continue
            now = time.time()
            for run in list(self._runs.values()):
                sig = signals.get(run.claim.batch_id)
                if sig is None or sig.status == CANCELLING:
                    run.request_stop("batch_cancelled")
                elif now >= sig.expires_at:
                    run.request_stop("batch_expired")

    # -- finalising and sweeping ---------------------------------------------------------------
    async def _finalize_loop(self) -> None:
        while True:
            batch = None
            try:
                batch = await self._store.claim_finalize(
                    self.owner,
                    time.time(),
                    FINALIZE_LEASE,
                    (new_id("file-"), new_id("file-")),
                )
                if batch is not None:
                    await self._finalizer.finalize(batch)
            except Exception:
                log.exception("finalising failed; it will be retried")
            if batch is None:
                # Woken at once when one of this engine's shards ends (often a batch's last).
                self._shard_ended.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._shard_ended.wait(), self._idle_wait())

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self.sweep()
            except Exception:
                log.exception("sweep failed")

    async def sweep(self) -> None:
        """Finish what crashed processes left (validations, batch starts) and collect deleted
        and expired files."""
        for batch in await self._store.validating_batches():
            await self._activator.activate(batch)
        if self._webhooks is not None:
            await self._webhooks.send_due()
        await self._store.expire_files(now())
        for rec in await self._store.deleted_files_unreferenced():
            await self._files.collect_if_unused(rec)
