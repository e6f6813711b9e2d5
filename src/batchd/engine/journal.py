"""A shard's local journal: every result is appended as it arrives, before checkpoints.

A process killed with ``kill -9`` loses nothing it wrote (the bytes are in the operating
system's cache), so the worker that takes the shard over on this machine adopts every
complete record that is not checkpointed yet instead of sending those requests again. Writes
are gathered and done on a worker thread every few milliseconds, never on the event loop.

Record: ``<index>\\t<o|e>\\t<result line>`` where index is the line's position in the shard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread

FLUSH_SECONDS = 0.005


def journal_dir(spool: Path, batch_id: str) -> Path:
    return spool / batch_id


def _path(spool: Path, batch_id: str, idx: int, token: int) -> Path:
    return journal_dir(spool, batch_id) / f"{idx}.{token}.journal"


def read_journals(
    spool: Path, batch_id: str, idx: int, below_token: int
) -> Iterator[tuple[int, bool, bytes]]:
    """Complete records of earlier holders of the shard: (index, is_output, line)."""
    d = journal_dir(spool, batch_id)
    if not d.is_dir():
        return
    for p in sorted(d.glob(f"{idx}.*.journal")):
        try:
            token = int(p.name.split(".")[1])
        except (IndexError, ValueError):
            continue
        if token >= below_token:
            continue
        data = p.read_bytes()
        for rec in data.split(b"\n")[:-1]:  # the last piece is empty or torn
            parts = rec.split(b"\t", 2)
            if len(parts) != 3 or parts[1] not in (b"o", b"e") or not parts[0].isdigit():
                continue
            yield int(parts[0]), parts[1] == b"o", parts[2] + b"\n"


class Journal:
    def __init__(self, spool: Path, batch_id: str, idx: int, token: int) -> None:
        self._path = _path(spool, batch_id, idx, token)
        self._buf: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._file: anyio.AsyncFile[bytes] | None = None

    async def open(self) -> None:
        await anyio.to_thread.run_sync(lambda: self._path.parent.mkdir(parents=True, exist_ok=True))
        self._file = await anyio.open_file(self._path, "ab", buffering=0)
        self._task = asyncio.get_running_loop().create_task(self._flusher())

    def append(self, index: int, is_output: bool, line: bytes) -> None:
        self._buf.append(b"%d\t%s\t%s" % (index, b"o" if is_output else b"e", line))

    async def flush(self) -> None:
        if self._buf and self._file is not None:
            data = b"".join(self._buf)
            self._buf.clear()
            await self._file.write(data)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        if self._file is not None:
            await self._file.aclose()
