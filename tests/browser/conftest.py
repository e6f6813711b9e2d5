from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.chromium import FLAGS, executable


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = executable()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium on this machine and CI is set: .ci/run installs it")
        pytest.skip("no chromium-headless-shell or chromium on this machine")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=FLAGS, headless=True)
        yield b
        b.close()
