"""Who may read what batchd keeps on disk: private by default.

The data directory and every folder batchd makes are ``0700`` and every file it writes (the
SQLite database, its WAL and shared-memory files, stored files, journals) is ``0600``
whatever the process's umask: uploads and results are other people's data. Both modes are
settings (``data_dir_mode``, ``data_file_mode``, e.g. ``0750``/``0640`` for a backup group).
A file is created with its mode (``os.open(..., mode)`` and ``fchmod``), never created
readable and narrowed afterwards. SQLite gives its ``-wal`` and ``-shm`` files the mode of
the database file, so creating that file first covers all three.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileModes:
    dir: int = 0o700
    file: int = 0o600


PRIVATE = FileModes()


def make_dirs(path: Path, mode: int) -> None:
    """``mkdir -p`` where every folder made gets exactly ``mode`` (not narrowed by the
    umask; an existing folder is left as it is)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode)
        except FileExistsError:
            continue  # made by another process or thread meanwhile
        os.chmod(folder, mode)


def create_file(path: Path, mode: int, *, exclusive: bool = True) -> int:
    """Open ``path`` for writing, created with exactly ``mode``; its descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def touch(path: Path, mode: int) -> None:
    """Create ``path`` empty with ``mode`` unless it exists (then leave it alone)."""
    try:
        os.close(create_file(path, mode))
    except FileExistsError:
        pass


def apply(path: Path, mode: int) -> None:
    """Give an existing file or folder ``mode`` (logged when that narrows or widens it)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current != mode:
        os.chmod(path, mode)
        log.info("%s: permissions %s -> %s", path, oct(current), oct(mode))
