"""Webhooks: ``batch.completed|failed|expired|cancelled`` events POSTed to the configured URLs.

Events come from the store's outbox (written in the transaction that ended the batch), so none
is lost when a process dies; delivery is at least once, retried with backoff for about a day.
Payloads have OpenAI's event shape, ``{id, object: "event", type, created_at, data: {id}}``,
and are signed the Standard Webhooks way that OpenAI uses: headers ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``
with the webhook's ``secret`` (a ``whsec_`` secret is base64; any other is used as bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING

import orjson

from batchd.config import Webhook
from batchd.models import BatchEvent, now
from batchd.store.protocols import OutboxStore
from batchd.telemetry.metrics import Metrics

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 20  # backoff 2 s · 4^(n-1), capped at an hour: about a day in all
DELIVERY_TIMEOUT = 10.0


def secret_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except binascii.Error:
            pass
    return secret.encode()


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    msg = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), msg, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    def __init__(
        self, hooks: list[Webhook], store: OutboxStore, metrics: Metrics | None = None
    ) -> None:
        self._hooks = hooks
        self._store = store
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    async def _deliver(self, hook: Webhook, event: BatchEvent, body: bytes) -> bool:
        import aiohttp  # only in a process that has webhooks to send (~5 MB)

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT)
            )
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": event.id,
            "webhook-timestamp": str(ts),
        }
        if hook.secret:
            headers["webhook-signature"] = sign(hook.secret, event.id, ts, body)
        try:
            async with self._session.post(hook.url, data=body, headers=headers) as resp:
                delivered = 200 <= resp.status < 300
                if not delivered:
                    log.warning("webhook %s answered %d for %s", hook.url, resp.status, event.id)
        except Exception as exc:  # any failure of one delivery: retried with backoff
            log.warning("webhook %s failed for %s: %s", hook.url, event.id, exc)
            delivered = False
        if self._metrics is not None:
            self._metrics.webhook(delivered)
        return delivered

    async def send_due(self) -> int:
        """Deliver the events that are due; return how many were delivered."""
        delivered = 0
        for event in await self._store.claim_events(time.time(), lease_seconds=60.0):
            ok = True
            try:
                body = orjson.dumps(event.to_wire())
                for hook in self._hooks:
                    if event.type in hook.events:
                        ok = await self._deliver(hook, event, body) and ok
            except Exception:
                log.exception("event %s (batch %s): delivery failed", event.id, event.batch_id)
                ok = False
            if ok:
                await self._store.event_done(event.id, now())
                delivered += 1
                continue
            attempts = event.attempts + 1
            retry_at = (
                time.time() + min(3600.0, 2.0 * 4 ** (attempts - 1))
                if attempts < MAX_ATTEMPTS
                else None
            )
            await self._store.event_retry(event.id, attempts, retry_at)
        return delivered

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
