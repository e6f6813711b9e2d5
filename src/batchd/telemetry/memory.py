"""This process's resident memory, for log lines (model loads)."""

from __future__ import annotations

import os
import resource
import sys


def resident_bytes() -> int:
    """Resident set size now (Linux: ``/proc/self/statm``); elsewhere the peak so far."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
