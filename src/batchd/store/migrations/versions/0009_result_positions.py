"""result positions: a part is one blob of result records with the batch position of its
first record (``first_pos``), fixed when its checkpoint commits

Parts written before this revision hold OpenAI output/error lines in two blobs and have no
positions. They exist only for batches that have not ended (finalising used to delete them),
so the upgrade refuses to run while there are any: let the running batches end (or cancel
them) on the previous version first.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _refuse_if_parts(what: str) -> None:
    left = op.get_bind().execute(sa.text("SELECT count(*) FROM parts")).scalar_one()
    if left:
        raise RuntimeError(
            f"{left} result parts of unfinished batches are stored in the {what} format; "
            "let those batches end (or cancel them) before this migration"
        )


def _create_parts(*columns: sa.Column[object]) -> None:
    """The parts table with ``columns`` between its key and its line counts."""
    op.create_table(
        "parts",
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("shard_idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        *columns,
        sa.Column("out_lines", sa.Integer(), nullable=False),
        sa.Column("err_lines", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("batch_id", "shard_idx", "seq"),
    )


def upgrade() -> None:
    _refuse_if_parts("previous")
    op.drop_table("parts")
    _create_parts(
        sa.Column("blob_key", sa.Text(), nullable=False),
        sa.Column("first_pos", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_parts_positions", "parts", ["batch_id", "first_pos"], unique=True)


def downgrade() -> None:
    _refuse_if_parts("record")
    op.drop_index("ix_parts_positions", table_name="parts")
    op.drop_table("parts")
    _create_parts(
        sa.Column("out_key", sa.Text(), nullable=True),
        sa.Column("err_key", sa.Text(), nullable=True),
    )
