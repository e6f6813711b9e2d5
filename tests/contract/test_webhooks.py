"""Webhooks: a signed event for every batch that ends, delivered to a real receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import base_config
from tests.support import Server, Upstream, chat_lines, wait_batch

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    got: list[tuple[dict[str, str], bytes]] = []
    calls = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            calls["n"] += 1
            if calls["n"] == 1:  # the first delivery fails: it must be retried
                self.send_response(503)
            else:
                got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", got
    httpd.shutdown()
    httpd.server_close()


def test_events_are_signed_and_retried(
    make_server: Callable[..., Server],
    upstream: Upstream,
    sdk: Callable[..., OpenAI],
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, got = receiver
    server = make_server(base_config(upstream, webhooks=[{"url": url, "secret": SECRET}]))
    c = sdk(server)
    ok = c.files.create(file=("ok.jsonl", chat_lines(3)), purpose="batch")
    done = wait_batch(
        c,
        c.batches.create(
            input_file_id=ok.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    bad = c.files.create(file=("bad.jsonl", chat_lines(2, model="missing")), purpose="batch")
    failed = wait_batch(
        c,
        c.batches.create(
            input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert (done.status, failed.status) == ("completed", "failed")
    deadline = time.time() + 30
    while len(got) < 2 and time.time() < deadline:
        time.sleep(0.2)
    events = {json.loads(body)["data"]["id"]: (headers, body) for headers, body in got}
    assert set(events) == {done.id, failed.id}
    for batch_id, kind in ((done.id, "batch.completed"), (failed.id, "batch.failed")):
        headers, body = events[batch_id]
        event = json.loads(body)
        assert event["type"] == kind and event["object"] == "event"
        assert event["id"] == headers["webhook-id"]
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        key = base64.b64decode(SECRET.removeprefix("whsec_"))
        want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        assert headers["webhook-signature"] == f"v1,{want}"
