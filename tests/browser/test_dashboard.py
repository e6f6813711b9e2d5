"""The dashboard in a real browser (the system's Chromium, see chromium.py) against a real
``batchd serve`` with ``[auth]`` (two projects) and the fake upstream."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import API_KEY, OTHER_KEY
from tests.support import Server, Upstream, chat_lines, wait_batch

BAD_INPUT = (
    chat_lines(1)
    + b"{not json\n"
    + b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}\n'
)


@pytest.fixture
def signed_in(browser: Any, server: Server) -> Iterator[Callable[[str], Any]]:
    """A page signed in with a key (a fresh browser context each: its own cookies)."""
    contexts: list[Any] = []

    def sign_in(key: str) -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.goto(server.url + "/ui/")
        assert page.url == server.url + "/ui/login"  # a key is asked for first
        page.fill("input[name=key]", key)
        page.click("button[name=sign_in]")
        page.wait_for_url(server.url + "/ui/")
        return page

    yield sign_in
    for c in contexts:
        c.close()


def _create(client: OpenAI, data: bytes) -> Any:
    f = client.files.create(file=("input.jsonl", data), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def _done(page: Any, batch_id: str) -> int:
    return int(page.inner_text(f"tr[data-batch='{batch_id}'] .done"))


def test_a_running_batch_moves_and_can_be_cancelled(
    signed_in: Callable[[str], Any], upstream: Upstream, sdk: Callable[..., OpenAI], server: Server
) -> None:
    upstream.control(latency=0.5)  # 32 in flight: about 64 requests a second
    client = sdk(server)
    batch = _create(client, chat_lines(600))
    page = signed_in(API_KEY)
    row = f"tr[data-batch='{batch.id}']"
    page.wait_for_selector(row)
    seen = [_done(page, batch.id)]
    deadline = time.time() + 15
    while len(set(seen)) < 3 and time.time() < deadline:  # the page polls: no reload here
        time.sleep(0.5)
        seen.append(_done(page, batch.id))
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen
    assert "req/s" in page.inner_text(f"{row} .rate")
    assert page.get_attribute(row, "data-status") == "in_progress"

    page.click(f"{row} a")
    page.wait_for_url(f"**/ui/batches/{batch.id}")
    page.click("button[name=cancel]")
    # the page follows the batch to its end
    page.wait_for_selector("#batch[data-status='cancelled']", timeout=15_000)
    ended = client.batches.retrieve(batch.id)
    assert ended.status == "cancelled"
    assert ended.request_counts.completed < 600
    assert int(page.inner_text("#batch .completed")) == ended.request_counts.completed
    assert int(page.inner_text("#batch .failed")) == ended.request_counts.failed


def test_errors_downloads_and_retry(
    signed_in: Callable[[str], Any], upstream: Upstream, sdk: Callable[..., OpenAI], server: Server
) -> None:
    client = sdk(server)
    failed = wait_batch(client, _create(client, BAD_INPUT).id)
    assert failed.status == "failed"
    upstream.control(reject_content="REJECT")
    done = wait_batch(client, _create(client, chat_lines(4) + chat_lines(2, prefix="REJECT")).id)
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 2)

    page = signed_in(API_KEY)
    page.goto(f"{server.url}/ui/batches/{failed.id}")
    rows = page.locator("table.errors tbody tr")
    assert rows.count() == len(failed.errors.data)
    first = rows.nth(0).inner_text()
    assert "line 2" in first and "invalid_json_line" in first
    assert "line 3" in rows.nth(1).inner_text()

    page.goto(f"{server.url}/ui/batches/{done.id}")
    lines = page.locator("table.error-lines tbody tr")
    assert lines.count() == 2
    text = lines.nth(0).inner_text()
    assert "REJECT-" in text and "400" in text and "This request was rejected." in text
    for label, file_id in (
        ("input", done.input_file_id),
        ("output", done.output_file_id),
        ("errors", done.error_file_id),
    ):
        href = page.get_attribute(f"ul.files a:text-is('{label}')", "href")
        resp = page.request.get(server.url + href)
        assert resp.status == 200
        assert resp.body() == client.files.content(file_id).read()

    page.click("button[name=retry]")
    page.wait_for_url(lambda url: "/ui/batches/" in url and done.id not in url)
    retry_id = page.url.rsplit("/", 1)[1]
    retry = wait_batch(client, retry_id)
    assert retry.metadata == {"retry_of": done.id}
    assert retry.request_counts.total == 2
    assert page.locator(f"a[href='/ui/batches/{done.id}']").count() == 1


def test_projects_see_only_their_own(
    signed_in: Callable[[str], Any], sdk: Callable[..., OpenAI], server: Server, upstream: Upstream
) -> None:
    a = wait_batch(sdk(server, key=API_KEY), _create(sdk(server, key=API_KEY), chat_lines(2)).id)
    b_client = sdk(server, key=OTHER_KEY)
    b = wait_batch(b_client, _create(b_client, chat_lines(2)).id)
    page_a, page_b = signed_in(API_KEY), signed_in(OTHER_KEY)
    for page, own, other in ((page_a, a, b), (page_b, b, a)):
        page.goto(server.url + "/ui/")
        assert page.locator(f"tr[data-batch='{own.id}']").count() == 1
        assert page.locator(f"tr[data-batch='{other.id}']").count() == 0
        assert "project team-" in page.inner_text("header")
        assert page.goto(f"{server.url}/ui/batches/{other.id}").status == 404
        assert page.goto(f"{server.url}/ui/files/{other.output_file_id}/content").status == 404
        page.goto(server.url + "/ui/files")
        assert page.locator(f"tr[id='{other.input_file_id}']").count() == 0
        assert page.locator(f"tr[id='{own.input_file_id}']").count() == 1


def test_upload_creates_a_batch(
    signed_in: Callable[[str], Any], sdk: Callable[..., OpenAI], server: Server, upstream: Upstream
) -> None:
    page = signed_in(OTHER_KEY)
    page.goto(server.url + "/ui/files")
    page.set_input_files(
        "input[name=file]",
        files=[{"name": "mine.jsonl", "mimeType": "application/jsonl", "buffer": chat_lines(3)}],
    )
    page.click("button[name=upload]")
    page.wait_for_url("**/ui/batches/batch_*")
    batch_id = page.url.rsplit("/", 1)[1]
    batch = wait_batch(sdk(server, key=OTHER_KEY), batch_id)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    assert batch.endpoint == "/v1/chat/completions"
    page.reload()
    assert page.get_attribute("#batch", "data-status") == "completed"

    page.goto(server.url + "/ui/deployments")
    row = page.inner_text("tr[data-deployment='gpt-4o']")
    assert "/ 32" in row  # in flight / the configured limit


def test_readable_on_a_phone(signed_in: Callable[[str], Any], server: Server) -> None:
    page = signed_in(API_KEY)
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server.url + "/ui/")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing wider than the screen
