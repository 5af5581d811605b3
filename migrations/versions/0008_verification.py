"""Verification that one party can't game (issue 15): providers the operator vouches for, and the
reference answers of trusted sources, kept across restarts and shared by processes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("vouched_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "canary_references",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("quantization", sa.String(32), primary_key=True),
        sa.Column("prompt", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_canary_references_user_id", "canary_references", ["user_id"])


def downgrade() -> None:
    op.drop_table("canary_references")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("vouched_at")
