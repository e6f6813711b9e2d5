"""Refresh the dashboard screenshots in docs/screenshots/ from a real server.

Starts the fake upstream (with latency, so one batch is still running) and ``batchd serve``
with ``[auth]``, makes a few batches (one completed with some failed requests, one failed
validation, one running), signs in with the system Chromium and saves:

- ``batches.png``: the batch list at 1280 px;
- ``batch.png``: the page of the completed batch with its error-file lines;
- ``batch-failed.png``: the page of the batch that failed validation;
- ``batches-phone.png``: the batch list at 390 px.

Run: ``python scripts/screenshots.py`` (needs ``chromium-headless-shell`` or ``chromium``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openai import OpenAI  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402
from tests.browser.chromium import FLAGS, executable  # noqa: E402
from tests.support import (  # noqa: E402
    chat_lines,
    start_server,
    start_upstream,
    wait_batch,
    write_config,
)

OUT = ROOT / "docs" / "screenshots"
KEY = "sk-screenshots"


def _batch(client: OpenAI, data: bytes, **metadata: str) -> Any:
    f = client.files.create(file=("requests.jsonl", data), purpose="batch")
    return client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata or None,
    )


def main() -> int:
    browser_path = executable()
    if browser_path is None:
        print("no chromium-headless-shell or chromium found", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        upstream = start_upstream(tmp)
        config = {
            "auth": {"keys": {KEY: "research"}},
            "deployments": [
                {"model": "gpt-4o", "base_url": upstream.v1, "max_concurrency": 8},
            ],
            "engine": {"poll_seconds": 0.1, "checkpoint_seconds": 0.2},
        }
        server = start_server(write_config(tmp, config), tmp)
        client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        try:
            upstream.control(reject_content="REJECT")
            done = _batch(
                client,
                chat_lines(46) + chat_lines(4, prefix="REJECT"),
                team="search",
                run="nightly-eval",
            )
            wait_batch(client, done.id)
            bad = chat_lines(2) + b"{not json\n" + b'{"custom_id": "q", "method": "POST"}\n'
            failed = _batch(client, bad, team="search")
            wait_batch(client, failed.id)
            upstream.control(latency=0.4, reject_content=None)
            running = _batch(client, chat_lines(2000), team="ranking", run="backfill")
            time.sleep(4)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=browser_path, args=FLAGS)
                page = browser.new_page(viewport={"width": 1280, "height": 720})
                page.goto(server.url + "/ui/login")
                page.fill("input[name=key]", KEY)
                page.click("button[name=sign_in]")
                page.wait_for_url(server.url + "/ui/")
                page.screenshot(path=str(OUT / "batches.png"), full_page=True)
                page.goto(f"{server.url}/ui/batches/{done.id}")
                page.screenshot(path=str(OUT / "batch.png"), full_page=True)
                page.goto(f"{server.url}/ui/batches/{failed.id}")
                page.screenshot(path=str(OUT / "batch-failed.png"), full_page=True)
                page.set_viewport_size({"width": 390, "height": 844})
                page.goto(server.url + "/ui/")
                page.screenshot(path=str(OUT / "batches-phone.png"), full_page=True)
                browser.close()
            client.batches.cancel(running.id)
        finally:
            client.close()
            server.proc.stop()
            upstream.proc.stop()
    for name in ("batches.png", "batch.png", "batch-failed.png", "batches-phone.png"):
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
