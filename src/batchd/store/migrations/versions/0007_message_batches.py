"""message batches: Anthropic's Message Batches over the project's batches

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "message_batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("project", sa.String(255), nullable=False),
        sa.Column(
            "batch_id",
            sa.String(64),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("deleted_at", sa.BigInteger(), nullable=True),
        sa.Column("counts", sa.LargeBinary(), nullable=True),
    )
    op.create_index("ix_message_batches_project_id", "message_batches", ["project", "id"])


def downgrade() -> None:
    op.drop_index("ix_message_batches_project_id", table_name="message_batches")
    op.drop_table("message_batches")
