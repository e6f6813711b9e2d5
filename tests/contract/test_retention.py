"""Result files go when their retention ends (issue 12 item 5): ``[limits]
output_retention`` applies to a batch that sets no ``output_expires_after`` (its result
files' ``expires_at``), and the reaper deletes the output file (bytes and object) once
it is past, and with them the batch's results (its part blobs)."""

from __future__ import annotations

import time
from collections.abc import Callable

import openai
import pytest
from openai import OpenAI

from tests.conftest import base_config
from tests.support import Server, Upstream, chat_lines, wait_batch


def test_output_files_are_deleted_after_the_default_retention(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    server = make_server(base_config(upstream, limits={"output_retention": 2}))
    client = sdk(server)
    f = client.files.create(file=("in.jsonl", chat_lines(3)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_batch(client, batch.id, timeout=30)
    assert done.status == "completed" and done.output_file_id
    out = client.files.retrieve(done.output_file_id)
    assert out.expires_at == out.created_at + 2
    parts = server.data_dir / "files" / "parts" / done.id
    assert any(parts.glob("*"))  # kept after finalising: the batch's results
    blob = server.data_dir / "files" / "outputs" / done.output_file_id
    deadline = time.time() + 15
    while blob.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not blob.exists()
    # the batch's results (its parts) go with its result files
    while any(parts.glob("*")) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(parts.glob("*"))
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(done.output_file_id)
    assert client.files.retrieve(f.id).id == f.id  # the input keeps its own 30 days
