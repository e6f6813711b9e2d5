"""``Idempotency-Key`` on creates (``POST /files``, ``POST /batches``): an extension that
CONTRACT.md's extensions section specifies.

The same key with the same request within 24 h answers the first request's object, made
once; the same key with another request is a 409 (``idempotency_key_reused``). Keys are per
project and live in the metadata store (:class:`batchd.store.protocols.IdempotencyKeyStore`), so
the guarantee holds across replicas. A second request that arrives while the first one runs
waits for it (up to ``wait_seconds``), then gets a 409 ``idempotency_key_in_use``.

"The same request" is a fingerprint, the sha256 hex digest of: for a batch, its create
fields (input_file_id, endpoint, completion_window, metadata, output_expires_after) and the
URL tree; for a file, the sha256 of its content, its purpose, file name and expiry.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from batchd.errors import Conflict, InProgress, InvalidRequest
from batchd.models import now
from batchd.store.protocols import IdempotencyKeyStore

T = TypeVar("T")

HEADER = "idempotency-key"
MAX_KEY = 255
_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as Stripe and the IETF draft use


def check_key(value: str | None) -> str | None:
    """The header's key, or None without one. Raises :class:`InvalidRequest` for an empty,
    longer than 255 characters, or non-visible-ASCII key."""
    if value is None:
        return None
    if not _KEY.fullmatch(value):
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY} visible ASCII characters.",
            code="invalid_value",
            param="Idempotency-Key",
        )
    return value


def fingerprint(*parts: Any) -> str:
    """sha256 hex of the parts as JSON (object keys sorted)."""
    return hashlib.sha256(orjson.dumps(list(parts), option=orjson.OPT_SORT_KEYS)).hexdigest()


class Idempotency:
    def __init__(
        self, keys: IdempotencyKeyStore, *, wait_seconds: float = 30.0, poll_seconds: float = 0.05
    ) -> None:
        self._keys = keys
        self._wait = wait_seconds
        self._poll = poll_seconds

    async def run(
        self,
        project: str,
        kind: str,
        key: str,
        print_: str,
        make: Callable[[], Awaitable[T]],
        fetch: Callable[[str], Awaitable[T]],
        id_of: Callable[[T], str],
    ) -> T:
        """``make()`` once per (project, kind, key): a replay answers ``fetch(first id)``.
        Raises :class:`Conflict` for a key used with another fingerprint, or still in use
        by a request that runs past ``wait_seconds``. A ``make`` that raises frees the key."""
        waited = 0.0
        delay = self._poll
        while True:
            state = await self._keys.claim(project, kind, key, print_, now())
            if state.claim == "new":
                break
            if state.claim == "replay":
                assert state.result_id is not None
                return await fetch(state.result_id)
            if state.claim == "conflict":
                raise Conflict(
                    "This Idempotency-Key was already used with a different request.",
                    code="idempotency_key_reused",
                    param="Idempotency-Key",
                )
            if waited >= self._wait:
                raise InProgress(
                    "A request with this Idempotency-Key is still in progress; send it again "
                    "shortly.",
                    code="idempotency_key_in_use",
                    param="Idempotency-Key",
                )
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.5)
        try:
            result = await make()
        except BaseException:
            await asyncio.shield(self._keys.release(project, kind, key))
            raise
        await asyncio.shield(self._keys.finish(project, kind, key, id_of(result)))
        return result
