"""A shard's local journal: every result is appended as it arrives, before checkpoints.

A process killed with ``kill -9`` loses nothing it wrote (the bytes are in the operating
system's cache), so the worker that takes the shard over on this machine adopts every
complete record that is not checkpointed yet instead of sending those requests again.

Record: ``<index>\\t<result record>`` where index is the line's position in the shard and the
result record is one line (:mod:`batchd.results.record`). Journals are named
``<shard>.<token>.records``; a journal of another format (an older version's) is not read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread

from batchd.filemodes import PRIVATE, make_dirs

_SUFFIX = ".records"


def journal_dir(spool: Path, batch_id: str) -> Path:
    return spool / batch_id


def _path(spool: Path, batch_id: str, idx: int, token: int) -> Path:
    return journal_dir(spool, batch_id) / f"{idx}.{token}{_SUFFIX}"


def read_journals(
    spool: Path, batch_id: str, idx: int, below_token: int
) -> Iterator[tuple[int, bytes]]:
    """Complete records of earlier holders of the shard: (index, record line)."""
    d = journal_dir(spool, batch_id)
    if not d.is_dir():
        return
    for p in sorted(d.glob(f"{idx}.*{_SUFFIX}")):
        try:
            token = int(p.name.split(".")[1])
        except (IndexError, ValueError):
            continue
        if token >= below_token:
            continue
        data = p.read_bytes()
        for rec in data.split(b"\n")[:-1]:  # the last piece is empty or torn
            index, tab, line = rec.partition(b"\t")
            if not tab or not index.isdigit():
                continue
            yield int(index), line + b"\n"


class Journal:
    """Append-only record of one shard holder's results.

    Each result is written with one ``write(2)`` on an ``O_APPEND`` descriptor as it arrives.
    This is the one place where the event loop calls the file system directly, on purpose:
    the call copies about a kilobyte into the page cache and returns in microseconds, and
    deferring it to a thread would open a window in which a ``kill -9`` loses results that
    were already received, which would then be sent upstream twice.
    """

    def __init__(self, spool: Path, batch_id: str, idx: int, token: int) -> None:
        self._path = _path(spool, batch_id, idx, token)
        self._fd: int | None = None

    async def open(self) -> None:
        def _open() -> int:
            make_dirs(self._path.parent, PRIVATE.dir)  # spool/ and its folders: 0700
            return os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

        self._fd = await anyio.to_thread.run_sync(_open)

    def append(self, index: int, record: bytes) -> None:
        """Journal the record line (``\\n``-ended) of the shard's line ``index``."""
        if self._fd is not None:
            os.write(self._fd, b"%d\t%s" % (index, record))

    async def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await anyio.to_thread.run_sync(os.close, fd)
