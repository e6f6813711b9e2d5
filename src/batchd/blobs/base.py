"""The blob contract: file bytes, streamed both ways.

Keys are relative paths made by batchd (``inputs/file-…``, ``parts/batch_…/…``); never a
user-supplied name. Two implementations: :mod:`batchd.blobs.local` (a directory) and an
S3-compatible bucket. A writer is all-or-nothing: bytes become visible under the key only
on :meth:`BlobWriter.commit`; :meth:`BlobWriter.abort` leaves nothing behind.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable
from types import TracebackType

CHUNK = 1024 * 1024


class BlobWriter(abc.ABC):
    """A streamed, atomic write of one blob."""

    written: int = 0

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def commit(self) -> int:
        """Make the blob visible; return its size."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard everything written."""

    async def __aenter__(self) -> BlobWriter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Commit is explicit; leaving the block without it (or with an error) aborts.
        if exc_type is not None or not getattr(self, "_committed", False):
            await self.abort()


class Blobs(abc.ABC):
    @abc.abstractmethod
    def writer(self, key: str) -> BlobWriter:
        """Start a streamed write of ``key``."""

    async def put(self, key: str, data: bytes) -> None:
        async with self.writer(key) as w:
            await w.write(data)
            await w.commit()

    @abc.abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes [start, end) of ``key``; raise BlobNotFound when it does not exist."""

    async def read_all(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        return b"".join([chunk async for chunk in self.read(key, start, end)])

    @abc.abstractmethod
    async def size(self, key: str) -> int:
        """Size in bytes; raise BlobNotFound."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; no error when it is already gone."""

    async def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            await self.delete(key)

    async def concat(self, key: str, sources: Iterable[str]) -> int:
        """Write the concatenation of ``sources`` to ``key`` (streamed); return its size."""
        async with self.writer(key) as w:
            for src in sources:
                async for chunk in self.read(src):
                    await w.write(chunk)
            return await w.commit()

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and sessions."""
