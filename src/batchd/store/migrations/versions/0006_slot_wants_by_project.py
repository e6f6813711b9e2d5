"""deployment slot leases say which projects want the slots (fair shares between projects)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 03:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployment_slots") as batch:
        batch.add_column(sa.Column("projects", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment_slots") as batch:
        batch.drop_column("projects")
