"""Token usage per project and deployment, as ``batchd usage`` and ``GET /v1/usage`` report.

``enqueued``: the counted tokens (:mod:`batchd.tokens`) of the batches not ended yet, what the
enqueued-token quotas hold; freed when a batch ends. ``input_tokens``/``output_tokens``:
what the upstream reported as used, summed over every batch kept in the store.
"""

from __future__ import annotations

from sqlalchemy import case, func, literal_column, select

from batchd.store.db import Database
from batchd.store.schema import batches
from batchd.store.types import UNFINISHED, TokenUsage


class SqlUsageStore:
    """Token usage from the SQL store (:class:`batchd.store.protocols.UsageStore`), rows of
    :class:`~batchd.store.types.TokenUsage`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def token_usage(self, project: str | None = None) -> list[TokenUsage]:
        """One row per (project, model) that has batches, ordered; one project's, or all."""
        live = batches.c.status.in_(UNFINISHED)
        # One expression in the select and the GROUP BY: with a bound "" in each, PostgreSQL
        # would see two expressions (and grouping by the label would name the column).
        model = func.coalesce(batches.c.model, literal_column("''"))
        q = select(
            batches.c.project,
            model.label("model"),
            func.coalesce(func.sum(case((live, batches.c.token_estimate), else_=0)), 0),
            func.coalesce(func.sum(batches.c.input_tokens), 0),
            func.coalesce(func.sum(batches.c.output_tokens), 0),
            func.coalesce(func.sum(case((live, 1), else_=0)), 0),
        ).group_by(batches.c.project, model)
        if project is not None:
            q = q.where(batches.c.project == project)
        async with self._db.read() as conn:
            rows = (await conn.execute(q.order_by(batches.c.project, "model"))).all()
        return [TokenUsage(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]
