"""BatchService on the in-memory store: create (and the activation it runs), read, list and
cancel, the files uploaded through FileService and batches finalised by the engine's
finaliser, as in the server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from batchd.errors import Conflict, InvalidRequest, NotFound
from batchd.models import CANCELLED, CANCELLING, FAILED, IN_PROGRESS
from tests.store_support import MODEL, InMemory, lines
from tests.support import chat_lines


@pytest.fixture
def svc(tmp_path: Path) -> InMemory:
    return InMemory(tmp_path, completion_windows=["24h", "48h"])


async def test_create_starts_the_batch_with_its_shards(svc: InMemory) -> None:
    file = await svc.upload(lines(5, "r"))
    batch = await svc.batches.create(
        "p",
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="48h",
        metadata={"run": "7"},
    )
    assert (batch.status, batch.total, batch.model) == (IN_PROGRESS, 5, MODEL)
    assert (batch.input_file_id, batch.input_blob_key) == (file.id, file.blob_key)
    assert batch.metadata == {"run": "7"} and batch.expires_at == batch.created_at + 48 * 3600
    assert await svc.batches.get("p", batch.id) == batch
    shards = await svc.store.queue.batch_shards(batch.id)
    assert [(i, span.first_line, span.count) for i, span, _ in shards] == [
        (0, 1, 2),
        (1, 3, 2),
        (2, 5, 1),
    ]
    claims = await svc.store.queue.claim_shards("w", 5, time.time(), 30)
    assert [c.idx for c in claims] == [0, 1, 2]  # runnable at once
    with pytest.raises(NotFound) as err:
        await svc.batches.get("q", batch.id)  # another project's
    assert err.value.code == "batch_not_found"


async def test_activation_fails_the_batch_with_every_problem(svc: InMemory) -> None:
    wrong_url = chat_lines(3, model=MODEL, url="/v1/embeddings", prefix="e")
    unserved = chat_lines(2, model="nobody-serves-this", prefix="u")
    for data, codes, lines_named in (
        (wrong_url, ["url_mismatch"] * 3, [1, 2, 3]),
        (unserved, ["model_not_found"], [1]),
    ):
        batch = await svc.create(data)
        assert batch.status == FAILED and batch.total == 0
        assert batch.errors is not None
        assert [(e.code, e.line) for e in batch.errors] == list(
            zip(codes, lines_named, strict=True)
        )
        assert await svc.store.queue.batch_shards(batch.id) == []
    # nothing of them is left to run
    assert await svc.store.queue.claim_shards("w", 5, time.time(), 30) == []


async def test_create_refuses_bad_parameters_and_stores_nothing(svc: InMemory) -> None:
    file = await svc.upload(lines(1, "r"))
    theirs = await svc.upload(lines(1, "r"), project="q")
    for kwargs, error, param in (
        ({"input_file_id": None}, InvalidRequest, "input_file_id"),
        ({"endpoint": "/v1/images"}, InvalidRequest, "endpoint"),
        ({"completion_window": "1h"}, InvalidRequest, "completion_window"),
        ({"metadata": {"k": 1}}, InvalidRequest, "metadata.k"),
        ({"input_file_id": "file-missing"}, NotFound, "input_file_id"),
        ({"input_file_id": theirs.id}, NotFound, "input_file_id"),
    ):
        args: dict[str, Any] = {
            "input_file_id": file.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **kwargs,
        }
        with pytest.raises(error) as err:
            await svc.batches.create("p", **args)
        assert err.value.param == param, kwargs
    assert await svc.batches.list("p", limit=10, after=None) == ([], False)


async def test_list_is_newest_first_by_project_with_a_cursor(svc: InMemory) -> None:
    made = [await svc.create(lines(1, f"b{i}")) for i in range(3)]
    await svc.create(lines(1, "other"), project="q")
    page, more = await svc.batches.list("p", limit=2, after=None)
    assert [b.id for b in page] == [made[2].id, made[1].id] and more
    page, more = await svc.batches.list("p", limit=2, after=page[-1].id)
    assert [b.id for b in page] == [made[0].id] and not more
    page, more = await svc.batches.list("p", limit=10, after=None)
    assert [b.id for b in page] == [b.id for b in reversed(made)] and not more


async def test_cancel_then_the_finaliser_ends_it_and_a_second_cancel_conflicts(
    svc: InMemory,
) -> None:
    batch = await svc.create(lines(3, "r"))
    cancelling = await svc.batches.cancel("p", batch.id)
    assert cancelling.status == CANCELLING and cancelling.cancelling_at is not None
    assert (await svc.batches.cancel("p", batch.id)).status == CANCELLING  # again: the same
    # no shard is claimed once the batch is cancelling
    assert await svc.store.queue.claim_shards("w", 5, time.time(), 30) == []
    ended = await svc.finalise(time.time())
    assert (ended.id, ended.status, ended.failed) == (batch.id, CANCELLED, 3)
    with pytest.raises(Conflict) as conflict:
        await svc.batches.cancel("p", batch.id)
    assert conflict.value.code == "batch_not_cancellable"
    for project, batch_id in (("q", batch.id), ("p", "batch_missing")):
        with pytest.raises(NotFound) as err:
            await svc.batches.cancel(project, batch_id)
        assert err.value.code == "batch_not_found"
    assert (await svc.batches.get("p", batch.id)).status == CANCELLED
