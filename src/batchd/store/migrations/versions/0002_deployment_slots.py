"""deployment slots: cluster-wide limits of a deployment, leased in shares by engine processes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 14:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployment_slots",
        sa.Column("deployment", sa.String(length=255), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("want", sa.Integer(), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("deployment", "owner"),
    )


def downgrade() -> None:
    op.drop_table("deployment_slots")
