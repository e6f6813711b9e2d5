"""Token usage per project and deployment, as ``batchd usage`` and ``GET /v1/usage`` report.

``enqueued``: the counted tokens (:mod:`batchd.tokens`) of the batches not ended yet, what the
enqueued-token quotas hold; freed when a batch ends. ``input_tokens``/``output_tokens``:
what the upstream reported as used, summed over every batch kept in the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select

from batchd.store.db import Database
from batchd.store.rows import UNFINISHED
from batchd.store.schema import batches


@dataclass(frozen=True, slots=True)
class TokenUsage:
    project: str
    model: str  # the deployment's model name; "" for a batch that never got one
    enqueued: int
    input_tokens: int
    output_tokens: int
    unfinished: int  # batches not ended

    def to_wire(self) -> dict[str, object]:
        return {
            "object": "usage",
            "project": self.project,
            "model": self.model,
            "enqueued_tokens": self.enqueued,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "unfinished_batches": self.unfinished,
        }


class SqlUsageStore:
    """Token usage from the SQL store (:class:`batchd.store.protocols.UsageStore`)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def token_usage(self, project: str | None = None) -> list[TokenUsage]:
        """One row per (project, model) that has batches, ordered; one project's, or all."""
        live = batches.c.status.in_(UNFINISHED)
        q = select(
            batches.c.project,
            func.coalesce(batches.c.model, "").label("model"),
            func.coalesce(func.sum(case((live, batches.c.token_estimate), else_=0)), 0),
            func.coalesce(func.sum(batches.c.input_tokens), 0),
            func.coalesce(func.sum(batches.c.output_tokens), 0),
            func.coalesce(func.sum(case((live, 1), else_=0)), 0),
        ).group_by(batches.c.project, func.coalesce(batches.c.model, ""))
        if project is not None:
            q = q.where(batches.c.project == project)
        async with self._db.read() as conn:
            rows = (await conn.execute(q.order_by(batches.c.project, "model"))).all()
        return [TokenUsage(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]
