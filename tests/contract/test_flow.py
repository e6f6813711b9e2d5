"""The seed's flow and its OpenAI twin, with the real SDK against a real server."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from openai import AzureOpenAI, OpenAI

from tests.conftest import API_KEY, base_config
from tests.support import Server, Upstream, chat_lines, read_jsonl, wait_batch


def test_seed_flow_azure(azure: AzureOpenAI, upstream: Upstream) -> None:
    """The notebook, step by step: upload, poll until processed, create, poll, download."""
    lines = [
        {
            "custom_id": f"task-{i}",
            "method": "POST",
            "url": "/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"hello {i}"}]},
        }
        for i in range(5)
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    file = azure.files.create(file=("test.jsonl", io.BytesIO(data)), purpose="batch")
    assert file.id.startswith("file-") and file.purpose == "batch" and file.bytes == len(data)
    status = file.status
    deadline = time.time() + 10
    while status != "processed":
        assert time.time() < deadline
        time.sleep(0.1)
        status = azure.files.retrieve(file.id).status
    batch = azure.batches.create(
        input_file_id=file.id, endpoint="/chat/completions", completion_window="24h"
    )
    assert batch.id.startswith("batch_")
    assert batch.endpoint == "/chat/completions"  # Azure echoes the endpoint as sent
    assert batch.status in ("validating", "in_progress")
    batch = wait_batch(azure, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (5, 5)
    assert batch.request_counts.failed == 0
    # Azure creates both files (the seed's output shows an error_file_id with 0 failures)
    assert batch.error_file_id is not None
    assert azure.files.content(batch.error_file_id).content == b""
    assert azure.files.retrieve(batch.error_file_id).bytes == 0
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.model == "gpt-4o"
    out = read_jsonl(azure.files.content(batch.output_file_id).text)
    assert sorted(r["custom_id"] for r in out) == [f"task-{i}" for i in range(5)]
    for r in out:
        assert r["id"].startswith("batch_req_")
        assert r["error"] is None
        assert r["response"]["status_code"] == 200
        n = r["custom_id"].split("-")[1]
        assert r["response"]["body"]["choices"][0]["message"]["content"] == f"echo: hello {n}"
    assert batch.usage is not None and batch.usage.total_tokens > 0
    page = azure.batches.list()
    assert batch.id in [b.id for b in page.data]
    out_file = azure.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.status == "processed"


def test_openai_flow_with_errors(client: OpenAI, upstream: Upstream) -> None:
    """OpenAI's client; a final 400 from upstream lands in the error file as returned."""
    upstream.control(reject_content="bad")
    data = (
        chat_lines(20)
        + json.dumps(
            {
                "custom_id": "bad-1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "bad"}]},
            }
        ).encode()
        + b"\n"
    )
    file = client.files.create(file=("in.jsonl", data), purpose="batch")
    # Created right away, while the file may still be checked: the batch waits in validating.
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.metadata == {"job": "nightly"}
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (20, 1)
    errors = read_jsonl(client.files.content(batch.error_file_id).text)
    assert len(errors) == 1 and errors[0]["custom_id"] == "bad-1"
    assert errors[0]["error"] is None
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["message"] == "This request was rejected."
    assert upstream.stats()["status"]["400"] == 1


def test_openai_v1_tree_on_azure_path(server: Server, sdk: Callable[..., OpenAI]) -> None:
    """Azure's newer /openai/v1 base works with the plain OpenAI client."""
    c = sdk(server, path="/openai/v1")
    file = c.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
    file = c.files.wait_for_processing(file.id, poll_interval=0.1)
    assert file.status == "processed"
    batch = c.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_batch(c, batch.id).status == "completed"


def test_embeddings(client: OpenAI) -> None:
    rows = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": f"text {i}"},
        }
        for i in range(4)
    ]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    file = client.files.create(file=("emb.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed"
    out = read_jsonl(client.files.content(batch.output_file_id).text)
    assert len(out) == 4
    assert all(len(r["response"]["body"]["data"][0]["embedding"]) == 8 for r in out)


def test_pagination(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    server = make_server(base_config(upstream))
    client = sdk(server)
    file = client.files.create(file=("p.jsonl", chat_lines(1)), purpose="batch")
    client.files.wait_for_processing(file.id, poll_interval=0.1)
    ids = [
        client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(5)
    ]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2]
    assert first.has_more is True
    seen = [b.id for b in client.batches.list(limit=2)]
    assert seen == ids[::-1]
    after = client.batches.list(limit=10, after=ids[2])
    assert [b.id for b in after.data] == ids[:2][::-1]
    assert after.has_more is False
    # Files list, both orders, with cursors.
    for i in range(3):
        client.files.create(file=(f"f{i}.jsonl", chat_lines(1)), purpose="batch")
    asc = [f.id for f in client.files.list(purpose="batch", order="asc", limit=2)]
    desc = [f.id for f in client.files.list(purpose="batch", order="desc")]
    assert asc == desc[::-1] and len(asc) == 4
    assert desc == sorted(desc, reverse=True)


def test_content_range_and_delete(client: OpenAI, server: Server) -> None:
    import urllib.request

    data = chat_lines(10)
    file = client.files.create(file=("r.jsonl", data), purpose="batch")
    req = urllib.request.Request(
        f"{server.url}/v1/files/{file.id}/content",
        headers={"Authorization": f"Bearer {API_KEY}", "Range": "bytes=10-29"},
    )
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206
        assert resp.headers["content-range"] == f"bytes 10-29/{len(data)}"
        assert resp.read() == data[10:30]
    assert client.files.content(file.id).content == data
    deleted = client.files.delete(file.id)
    assert deleted.deleted is True and deleted.id == file.id
    with pytest.raises(Exception) as exc:
        client.files.retrieve(file.id)
    assert getattr(exc.value, "status_code", None) == 404


def test_deleting_input_of_running_batch(client: OpenAI, upstream: Upstream) -> None:
    upstream.control(latency=0.05)
    file = client.files.create(file=("d.jsonl", chat_lines(60)), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_batch(client, batch.id, statuses=("in_progress", "completed"))
    client.files.delete(file.id)
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.completed == 60


def test_projects_are_isolated(server: Server, sdk: Callable[..., OpenAI]) -> None:
    from tests.conftest import OTHER_KEY

    a = sdk(server)
    b = sdk(server, OTHER_KEY)
    file = a.files.create(file=("a.jsonl", chat_lines(1)), purpose="batch")
    for call in (
        lambda: b.files.retrieve(file.id),
        lambda: b.files.content(file.id),
        lambda: b.files.delete(file.id),
        lambda: b.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(Exception) as exc:
            call()
        assert getattr(exc.value, "status_code", None) == 404
    assert b.files.list().data == []
    bad = sdk(server, "sk-wrong")
    with pytest.raises(Exception) as exc:
        bad.files.list()
    assert getattr(exc.value, "status_code", None) == 401


def test_azure_key_header_and_api_version(server: Server) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"{server.url}/openai/batches?api-version=2099-01-01", headers={"api-key": API_KEY}
    )
    with urllib.request.urlopen(req) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    assert body["object"] == "list" and body["has_more"] is False


def test_base64_roundtrip_of_binary_safe_upload(client: OpenAI) -> None:
    """Bytes come back exactly as uploaded, including non-ASCII text."""
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "héllo ✓ " + base64.b64encode(bytes(range(256))).decode()}
        ],
    }
    data = (
        json.dumps(
            {"custom_id": "u", "method": "POST", "url": "/v1/chat/completions", "body": body},
            ensure_ascii=False,
        )
        + "\n"
    ).encode()
    file = client.files.create(file=("u.jsonl", data), purpose="batch")
    assert client.files.content(file.id).content == data


def test_openapi_document_and_file_expiry(client: OpenAI, server: Server) -> None:
    import urllib.request

    with urllib.request.urlopen(server.url + "/openapi.json") as resp:
        doc = json.loads(resp.read())
    assert {"/v1/files", "/v1/batches", "/v1/batches/{batch_id}/cancel"} <= set(doc["paths"])
    f = client.files.create(
        file=("x.jsonl", chat_lines(1)),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert f.expires_at == f.created_at + 7200
    default = client.files.create(file=("y.jsonl", chat_lines(1)), purpose="batch")
    assert default.expires_at == default.created_at + 30 * 86400
