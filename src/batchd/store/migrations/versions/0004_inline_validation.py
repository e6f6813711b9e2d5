"""files are validated while they are uploaded: no validation lease any more

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 15:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_column("validate_owner")
        batch.drop_column("validate_until")


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("validate_owner", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("validate_until", sa.Float(), nullable=True))
