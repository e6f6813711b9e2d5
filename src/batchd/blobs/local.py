"""Blobs in a local directory (the embedded default: ``data_dir/files``).

File I/O runs on worker threads (anyio), never on the event loop. A write goes to a
temporary file beside its target and is renamed into place on commit, so a reader or a
crash never sees half a blob. Folders and files are made with the modes given (private by
default: see :mod:`batchd.filemodes`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread

from batchd.blobs.base import CHUNK, Blobs, BlobWriter
from batchd.errors import BlobError, BlobNotFound
from batchd.filemodes import PRIVATE, FileModes, create_file, make_dirs


class LocalBlobWriter(BlobWriter):
    def __init__(self, path: Path, modes: FileModes = PRIVATE) -> None:
        self._path = path
        self._modes = modes
        self._tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        self._file: anyio.AsyncFile[bytes] | None = None
        self._buf: list[bytes] = []
        self._buffered = 0
        self._committed = False
        self.written = 0

    async def _open(self) -> anyio.AsyncFile[bytes]:
        if self._file is None:

            def create() -> int:
                make_dirs(self._path.parent, self._modes.dir)
                return create_file(self._tmp, self._modes.file)

            fd = await anyio.to_thread.run_sync(create)
            self._file = anyio.wrap_file(os.fdopen(fd, "wb"))
        return self._file

    async def _flush(self) -> None:
        if self._buf:
            f = await self._open()
            data = b"".join(self._buf)
            self._buf.clear()
            self._buffered = 0
            await f.write(data)

    async def write(self, data: bytes) -> None:
        # Small writes are gathered so that each thread hop moves about a megabyte.
        self._buf.append(bytes(data))
        self._buffered += len(data)
        self.written += len(data)
        if self._buffered >= CHUNK:
            await self._flush()

    async def commit(self) -> int:
        await self._flush()
        f = await self._open()
        await f.aclose()
        await anyio.to_thread.run_sync(os.replace, self._tmp, self._path)
        self._committed = True
        return self.written

    async def abort(self) -> None:
        if self._committed:
            return
        if self._file is not None:
            await self._file.aclose()
        self._buf.clear()
        await anyio.to_thread.run_sync(lambda: self._tmp.unlink(missing_ok=True))


class LocalBlobs(Blobs):
    def __init__(self, root: Path, modes: FileModes = PRIVATE) -> None:
        self._modes = modes
        self._root = root.resolve()
        make_dirs(self._root, modes.dir)

    def _path(self, key: str) -> Path:
        path = (self._root / key).resolve()
        if not path.is_relative_to(self._root) or path == self._root:
            raise BlobError(f"blob key {key!r} leaves the blob directory")
        return path

    def writer(self, key: str) -> BlobWriter:
        return LocalBlobWriter(self._path(key), self._modes)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            f = await anyio.open_file(path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        async with f:
            if start:
                await f.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                n = CHUNK if remaining is None else min(CHUNK, remaining)
                chunk = await f.read(n)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    async def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = await anyio.to_thread.run_sync(path.stat)
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        return st.st_size

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
