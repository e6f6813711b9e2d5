"""Idempotency keys and named leases in memory (:mod:`batchd.store.memory`), with the
contract of their SQL store (:mod:`batchd.store.keyed`)."""

from __future__ import annotations

from batchd.store.memory_state import KeyRow, MemoryState
from batchd.store.types import KeyState, held_key


class MemoryIdempotencyKeys:
    """See :class:`batchd.store.keyed.IdempotencyKeys`: ``ttl`` and ``stale`` in seconds."""

    def __init__(self, state: MemoryState, *, ttl: int = 86400, stale: int = 3600) -> None:
        self._s = state
        self._ttl = ttl
        self._stale = stale

    async def claim(
        self, project: str, kind: str, key: str, fingerprint: str, now: int
    ) -> KeyState:
        k = self._s.keys.get((project, kind, key))
        if k is not None:
            held = held_key(
                k.fingerprint, k.result_id, k.created_at, fingerprint, now,
                ttl=self._ttl, stale=self._stale,
            )
            if held is not None:
                return held
        self._s.keys[(project, kind, key)] = KeyRow(fingerprint, None, now)
        return KeyState("new")

    async def finish(self, project: str, kind: str, key: str, result_id: str) -> None:
        k = self._s.keys.get((project, kind, key))
        if k is not None:
            k.result_id = result_id

    async def release(self, project: str, kind: str, key: str) -> None:
        k = self._s.keys.get((project, kind, key))
        if k is not None and k.result_id is None:
            del self._s.keys[(project, kind, key)]

    async def forget_lapsed(self, now: int) -> int:
        lapsed = [n for n, k in self._s.keys.items() if k.created_at <= now - self._ttl]
        for n in lapsed:
            del self._s.keys[n]
        return len(lapsed)


class MemoryLeases:
    def __init__(self, state: MemoryState) -> None:
        self._s = state

    async def acquire(self, name: str, owner: str, now: float, seconds: float) -> bool:
        held = self._s.leases.get(name)
        if held is not None and held[0] != owner and held[1] >= now:
            return False
        self._s.leases[name] = (owner, now + seconds)
        return True

    async def release(self, name: str, owner: str) -> None:
        if self._s.leases.get(name, ("", 0.0))[0] == owner:
            del self._s.leases[name]
