"""The engine's finaliser and the batch services on the in-memory store
(:mod:`batchd.store.memory`): the seams take any implementation of the store's protocols.
The memory store keeps the SQL stores' contract (tests/integration/test_store_contract.py
runs on all three), so these need no database."""

from __future__ import annotations

import json
from pathlib import Path

from batchd.blobs.local import LocalBlobs
from batchd.config import Settings
from batchd.engine.finalize import Finalizer
from batchd.models import CANCELLED, CANCELLING, IN_PROGRESS, UNEXECUTED_SHARD, Usage, now
from batchd.results.openai import openai_line
from batchd.results.reader import read_results
from batchd.results.record import decode
from batchd.service.activation import Activator
from batchd.store.memory import memory_store
from tests.store_support import commit_results, lines, make_batch


async def test_a_cancelled_batch_finalises_with_its_results_in_memory(tmp_path: Path) -> None:
    store = memory_store()
    blobs = LocalBlobs(tmp_path / "files")
    settings = Settings(
        data_dir=tmp_path, deployments=[{"model": "m", "base_url": "http://127.0.0.1:9/v1"}]
    )
    batch = await make_batch(store, blobs, lines(5, "r"))  # shards of 2, 2 and 1 lines
    await Activator(settings, store.files, store.batches).activate(batch)
    started = await store.batches.get_batch(batch.id)
    assert started is not None and (started.status, started.total) == (IN_PROGRESS, 5)

    # One worker runs the first shard to its end; the batch is cancelled meanwhile.
    t = now()
    claims = await store.queue.claim_shards("w", 1, t, 30)
    assert [(c.batch_id, c.idx, c.token) for c in claims] == [(batch.id, 0, 1)]
    records = await commit_results(store.queue, blobs, claims[0], [200, 200])  # shard done
    cancelling = await store.batches.request_cancel(batch.id, "p", t)
    assert cancelling is not None and cancelling.status == CANCELLING

    leased = await store.queue.claim_finalize("w", t + 1, 60, ("file-out", "file-err"))
    assert leased is not None and leased.id == batch.id
    await Finalizer(store.queue, blobs, tmp_path / "spool", "w").finalize(leased)

    ended = await store.batches.get_batch(batch.id)
    assert ended is not None
    assert (ended.status, ended.completed, ended.failed) == (CANCELLED, 2, 3)
    assert (ended.output_file_id, ended.error_file_id) == ("file-out", "file-err")
    assert ended.usage == Usage(4, 0, 6, 0)
    out_file = await store.files.get_file("file-out", "p")
    err_file = await store.files.get_file("file-err", "p")
    assert out_file is not None and err_file is not None
    out = b"".join(openai_line(batch.id, i, decode(r)) for i, r in enumerate(records))
    assert await blobs.read_all(out_file.blob_key) == out
    errors = [json.loads(x) for x in (await blobs.read_all(err_file.blob_key)).splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        (f"r-{i}", "batch_cancelled") for i in (2, 3, 4)
    ]
    # the parts stay (the batch's results): the executed ones, then the never-executed ones
    parts = await store.queue.result_parts(batch.id)
    assert [(p.shard_idx, p.first_pos, p.out_lines, p.err_lines) for p in parts] == [
        (0, 0, 2, 0),
        (UNEXECUTED_SHARD, 2, 0, 3),
    ]
    read = [(pos, r.outcome) async for pos, r in read_results(store.queue, blobs, batch.id)]
    assert read == [(0, "succeeded"), (1, "succeeded")] + [(i, CANCELLED) for i in (2, 3, 4)]
    [event] = await store.outbox.claim_events(t + 2, 60)
    assert (event.batch_id, event.type) == (batch.id, "batch.cancelled")
