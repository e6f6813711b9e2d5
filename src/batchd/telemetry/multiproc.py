"""``prometheus_client``'s multiprocess mode for ``batchd serve`` and its engine process.

Each process writes its series to memory-mapped files in one directory
(``PROMETHEUS_MULTIPROC_DIR``); ``/metrics`` reads and adds them up at scrape time. The
directory must be named before ``prometheus_client`` is first imported (the library reads
the variable then), so ``batchd serve`` calls :func:`use_directory` first thing; the engine
process inherits the variable. See
https://prometheus.github.io/client_python/multiprocess/.
"""

from __future__ import annotations

import os
from pathlib import Path

from batchd.filemodes import PRIVATE, make_dirs

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_directory(path: Path) -> Path:
    """Empty ``path`` of earlier runs' files (created if need be) and make it the multiprocess
    directory of this process and of the processes it starts."""
    make_dirs(path, PRIVATE.dir)  # data_dir may not exist yet: made private here too
    for old in path.glob("*.db"):
        old.unlink(missing_ok=True)
    os.environ[ENV] = str(path.resolve())
    return path


def directory() -> str | None:
    """The multiprocess directory in use, if any."""
    return os.environ.get(ENV) or None


def mark_dead(pid: int) -> None:
    """Forget the live gauges of a process that has exited (its counters stay counted)."""
    path = directory()
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
