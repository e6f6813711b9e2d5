"""``Idempotency-Key`` on ``POST /files`` and ``POST /batches`` (issue 12 item 4, CONTRACT.md's
extensions): the same key and body give the first object, another body a final 409, and two
creates racing with one key make exactly one batch."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from tests.conftest import base_config
from tests.support import Server, Upstream, chat_lines


def _key(k: str) -> dict[str, str]:
    return {"Idempotency-Key": k}


def test_same_key_same_batch_is_the_first_and_other_body_is_409(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    server = make_server(base_config(upstream))
    client = sdk(server)
    f = client.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")
    args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    first = client.batches.create(**args, extra_headers=_key("k-1"))  # type: ignore[arg-type]
    again = client.batches.create(**args, extra_headers=_key("k-1"))  # type: ignore[arg-type]
    assert again.id == first.id
    assert [b.id for b in client.batches.list().data] == [first.id]
    with pytest.raises(openai.ConflictError) as info:
        client.batches.create(  # type: ignore[call-overload]
            **args, metadata={"other": "body"}, extra_headers=_key("k-1")
        )
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.code == "idempotency_key_reused"
    # Another key, or another project with the same key, is another batch.
    other = client.batches.create(**args, extra_headers=_key("k-2"))  # type: ignore[arg-type]
    assert other.id != first.id
    plain = client.batches.create(**args)  # type: ignore[arg-type]
    assert len({first.id, other.id, plain.id}) == 3


def test_two_concurrent_creates_with_one_key_make_one_batch(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    server = make_server(base_config(upstream))
    client = sdk(server)
    f = client.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")

    def create(_: int) -> str:
        return (
            sdk(server)
            .batches.create(
                input_file_id=f.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                extra_headers=_key("race"),
            )
            .id
        )

    with ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(create, range(2)))
    assert ids[0] == ids[1]
    assert [b.id for b in client.batches.list().data] == [ids[0]]


def test_same_key_same_upload_is_one_file_and_other_content_is_409(
    make_server: Callable[..., Server], upstream: Upstream, sdk: Callable[..., OpenAI]
) -> None:
    server = make_server(base_config(upstream))
    client = sdk(server)
    data = chat_lines(3)
    first = client.files.create(file=("in.jsonl", data), purpose="batch", extra_headers=_key("up"))
    again = client.files.create(file=("in.jsonl", data), purpose="batch", extra_headers=_key("up"))
    assert again.id == first.id
    assert [x.id for x in client.files.list().data] == [first.id]
    inputs = sorted(p.name for p in (server.data_dir / "files" / "inputs").iterdir())
    assert inputs == [first.id]  # the replayed upload's bytes were not kept
    for file in (("in.jsonl", chat_lines(4)), ("other.jsonl", data)):
        with pytest.raises(openai.ConflictError) as info:
            client.files.create(file=file, purpose="batch", extra_headers=_key("up"))
        assert info.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("in.jsonl", data), purpose="batch", extra_headers=_key("a b"))
