"""The system's Chromium for browser tests and screenshots, driven by Playwright.

Debian's ``chromium-headless-shell`` (or ``chromium``) is used through ``executable_path``:
``playwright install`` (which downloads a browser build) is never needed. ``BATCHD_CHROMIUM``
names another binary.
"""

from __future__ import annotations

import os
import shutil

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def executable() -> str | None:
    """The browser binary, or None when the machine has none."""
    named = os.environ.get("BATCHD_CHROMIUM")
    if named:
        return named
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None
