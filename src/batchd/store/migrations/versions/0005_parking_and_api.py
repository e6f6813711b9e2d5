"""shards can be parked until a time; batches remember which API tree created them

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 02:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("not_before", sa.Float(), nullable=True))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("api", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("endpoint_as_sent", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("endpoint_as_sent")
        batch.drop_column("api")
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("not_before")
