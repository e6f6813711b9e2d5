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
from collections.abc import AsyncIterator, Awaitable, Coroutine
from pathlib import Path
from typing import Any

from batchd.backends.base import Backend
from batchd.blobs.base import Blobs
from batchd.config import Settings
from batchd.engine.checkpoints import Checkpointer
from batchd.engine.content_filter import build_content_filter
from batchd.engine.failures import MAX_TRIES, FailureTracker
from batchd.engine.finalize import Finalizer
from batchd.engine.limits import DeploymentLimiter
from batchd.engine.retry import RetryPolicy
from batchd.engine.shard import Route, ShardRun
from batchd.engine.slots import SlotLeaser
from batchd.engine.webhooks import WebhookSender
from batchd.errors import LeaseLost
from batchd.models import CANCELLING, BatchRecord, ValidationIssue, new_id, now
from batchd.service.activation import Activator
from batchd.service.files import FileService
from batchd.service.retention import Reaper
from batchd.store.protocols import Store
from batchd.telemetry.logs import about
from batchd.telemetry.metrics import Metrics
from batchd.tokens import InputCounter, TokenCounter

log = logging.getLogger(__name__)

SIGNAL_SECONDS = 0.5
SWEEP_SECONDS = 2.0
RETENTION_LEASE_SWEEPS = 5  # the reaper's lease outlives this many sweeps without renewal
# Finalising is leased briefly and renewed by a heartbeat: a finaliser that died is taken
# over within seconds.
FINALIZE_LEASE = 10.0
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
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self._settings = settings
        self._store = store
        self._blobs = blobs
        self._backends = backends
        self.owner = owner
        self._cfg = settings.engine
        self._spool = Path(settings.data_dir) / "spool"
        # Limiters start with no slots: the first lease (at start) gives each its share.
        self._routes = {
            d.model: Route(
                backends[d.model],
                limiter := DeploymentLimiter(d, capacity=0, weight=settings.project_weight),
                d.timeout,
                RetryPolicy(max_attempts=d.max_attempts),
                self.metrics.deployment(d.model, limiter),
            )
            for d in settings.effective_deployments()
            if d.model in backends
        }
        self._activation_failures = FailureTracker("starting batch")
        self._finalize_failures = FailureTracker("finalising batch")
        self._shard_failures = FailureTracker("running shard")
        self.slots = SlotLeaser(
            store.slots,
            owner,
            [r.limiter for r in self._routes.values()],
            self._cfg.lease_seconds,
            settings.project_weight,
        )
        self.content_filter = build_content_filter(settings.content_filter, backends)
        self._runs: dict[tuple[str, int], ShardRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._shard_ended = asyncio.Event()
        # One checkpoint transaction per interval for every shard this engine runs.
        self.checkpointer = Checkpointer(store.queue, self._cfg.checkpoint_seconds)
        self._finalizer = Finalizer(store.queue, blobs, self._spool, owner)
        self._tokens = TokenCounter(settings)
        self._tpm_tokens = self._tokens.tpm_tokens()
        counter = InputCounter(self._tokens, blobs)
        self._activator = Activator(settings, store.files, store.batches, counter)
        self._files = FileService(settings, store.files, blobs)
        self._reaper = Reaper(
            store, self._files, owner=owner, lease_seconds=RETENTION_LEASE_SWEEPS * SWEEP_SECONDS
        )
        self._webhooks = (
            WebhookSender(settings.webhooks, store.outbox, self.metrics)
            if settings.webhooks
            else None
        )

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
            self.metrics.run(),
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
            with contextlib.suppress(Exception):
                await self._reaper.release()
            if self.content_filter is not None:
                await self.content_filter.close()
            for backend in self._backends.values():
                await backend.close()
            if self._webhooks is not None:
                await self._webhooks.close()
            log.info("engine %s stopped", self.owner)

    def wake(self) -> None:
        """New work may be waiting (a batch started): claim now, not at the next poll."""
        self._wake.set()

    # -- claiming and running shards -------------------------------------------------------
    async def _claim_loop(self) -> None:
        while True:
            free = self._cfg.max_shards - len(self._runs)
            claims = []
            # Full: still one more shard at a time of a batch nobody runs, so that a new batch
            # starts within seconds however long the running ones take (at most twice
            # max_shards; the slots themselves are shared fairly, see fair_slots.py).
            idle_only = free <= 0 and len(self._runs) < 2 * self._cfg.max_shards
            if free > 0 or idle_only:
                try:
                    claims = await self._store.queue.claim_shards(
                        self.owner,
                        max(free, 1),
                        time.time(),
                        self._cfg.lease_seconds,
                        paused_models=self._paused_models(),
                        idle_batches_only=idle_only,
                    )
                except Exception:
                    log.exception("claiming shards failed")
            for claim in claims:
                run = ShardRun(
                    claim=claim,
                    store=self._store.queue,
                    blobs=self._blobs,
                    spool=self._spool,
                    routes=self._routes,
                    checkpoint_seconds=self._cfg.checkpoint_seconds,
                    cancel_grace=self._cfg.cancel_grace_seconds,
                    checkpointer=self.checkpointer,
                    content_filter=self.content_filter,
                    tokens_of=self._tpm_tokens,
                )
                self._runs[run.key] = run
                self._spawn(self._run_shard(run))
            if not claims:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_wait())

    def _paused_models(self) -> list[str]:
        """Deployments paused (by a ``retry-after``) for longer than a shard would wait: their
        shards are not claimed until the pause ends."""
        return [
            model
            for model, route in self._routes.items()
            if route.limiter.pause_left() > route.policy.park_after
        ]

    async def _run_shard(self, run: ShardRun) -> None:
        try:
            await run.run()
        except LeaseLost:
            log.warning("shard %s/%d: lease lost to a worker", *run.key, extra=about(run.claim))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._shard_failed(run, exc)
        else:
            self._shard_failures.succeeded(f"{run.key[0]}/{run.key[1]}")
        finally:
            if run.park_until:
                log.info(
                    "shard %s/%d parked for %.0f s: the deployment asked for a pause",
                    *run.key,
                    run.park_until - time.time(),
                    extra=about(run.claim),
                )
            self._runs.pop(run.key, None)
            self._wake.set()
            self._shard_ended.set()

    async def _shard_failed(self, run: ShardRun, exc: Exception) -> None:
        """A shard whose run raised (its input unreadable, say) is released and not claimed
        again before a backoff, not retried at once in a loop; after a few failures its
        batch ends ``failed``."""
        key = f"{run.key[0]}/{run.key[1]}"
        failures = self._shard_failures
        count = failures.failed(key, exc)
        if failures.given_up(key):
            await self._give_up(run.claim.batch_id, failures, "run", key=key)
            return
        not_before = time.time() + min(60.0, 2.0 * 2 ** (count - 1))
        try:
            await self._store.queue.release_shard(run.claim, not_before)
        except Exception:
            log.exception("shard %s: releasing it failed; its lease lapses instead", key)

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
                lost = await self._store.queue.renew_leases(
                    self.owner, held, time.time() + self._cfg.lease_seconds
                )
            except Exception:
                log.exception("renewing leases failed")
                continue
            for key in lost:
                run = self._runs.get(key)
                if run is not None:
                    log.warning("shard %s/%d: lease lost", *key, extra=about(run.claim))
                    run.lost = True
                    run.request_stop("batch_cancelled")

    async def _signal_loop(self) -> None:
        """Cancel and expiry reach every running shard within half a second."""
        while True:
            await asyncio.sleep(SIGNAL_SECONDS)
            if not self._runs:
                continue
            try:
                running = [r.claim.batch_id for r in self._runs.values()]
                signals = await self._store.batches.signals(running)
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
                batch = await self._store.queue.claim_finalize(
                    self.owner,
                    time.time(),
                    FINALIZE_LEASE,
                    (new_id("file-"), new_id("file-")),
                )
            except Exception:
                log.exception("looking for batches to finalise failed")
            if batch is not None:
                await self._finalize_one(batch)
            else:
                # Woken at once when one of this engine's shards ends (often a batch's last).
                self._shard_ended.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._shard_ended.wait(), self._idle_wait())

    async def _finalize_one(self, batch: BatchRecord) -> None:
        """Finalise one leased batch, renewing the lease while it runs. A failure is retried
        (the lease lapses and the batch is claimed again) and, after a few, ends the batch
        ``failed``; the loop goes on with the other batches meanwhile."""
        heartbeat = asyncio.get_running_loop().create_task(self._renew_finalize(batch.id))
        try:
            await self._try_batch(
                self._finalize_failures, batch.id, "finalised", self._finalizer.finalize(batch)
            )
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _renew_finalize(self, batch_id: str) -> None:
        while True:
            await asyncio.sleep(FINALIZE_LEASE / 3)
            try:
                await self._store.queue.renew_finalize(
                    batch_id, self.owner, time.time() + FINALIZE_LEASE
                )
            except Exception:
                log.exception("batch %s: renewing the finalising lease failed", batch_id)

    async def _try_batch(
        self, failures: FailureTracker, batch_id: str, what: str, work: Awaitable[None]
    ) -> None:
        """Run one batch's step; a failure is counted (and logged) for that batch alone, and
        after :data:`MAX_TRIES` the batch ends ``failed``."""
        try:
            await work
        except Exception as exc:
            failures.failed(batch_id, exc)
            if failures.given_up(batch_id):
                await self._give_up(batch_id, failures, what)
        else:
            failures.succeeded(batch_id)

    async def _give_up(
        self, batch_id: str, failures: FailureTracker, what: str, *, key: str | None = None
    ) -> None:
        """End a batch whose handling (of ``key``: the batch, or one of its shards) keeps
        failing: ``failed``, naming the error."""
        key = key or batch_id
        issue = ValidationIssue(
            "internal_error",
            f"The batch could not be {what} after {MAX_TRIES} tries: {failures.last_error(key)}",
            None,
            None,
        )
        try:
            if await self._store.batches.fail_started_batch(batch_id, issue, now()):
                log.error(
                    "batch %s failed: %s", batch_id, issue.message, extra={"batch_id": batch_id}
                )
            failures.succeeded(key)
        except Exception:
            log.exception("batch %s: recording its failure failed", batch_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self.sweep()
            except Exception:
                log.exception("sweep failed")

    async def sweep(self) -> None:
        """Finish what crashed processes left (validations, batch starts) and collect deleted
        and expired files (the :class:`~batchd.service.retention.Reaper`). Each step, and
        each batch within a step, fails on its own: an error is logged with the batch's id
        and the rest goes on."""
        await self._start_waiting_batches()
        steps: list[Coroutine[Any, Any, object]] = [self._reaper.reap()]
        if self._webhooks is not None:
            steps.insert(0, self._webhooks.send_due())
        for step in steps:
            try:
                await step
            except Exception:
                log.exception("sweep step failed; it runs again in %.0f s", SWEEP_SECONDS)

    async def _start_waiting_batches(self) -> None:
        failures = self._activation_failures
        try:
            waiting = await self._store.batches.validating_batches()
        except Exception:
            log.exception("reading the batches waiting to start failed")
            return
        for batch in waiting:
            if not failures.due(batch.id):
                continue
            await self._try_batch(failures, batch.id, "started", self._activator.activate(batch))
