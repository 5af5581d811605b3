"""Per-minute pool status history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "status_minutes",
        sa.Column("minute", sa.BigInteger(), primary_key=True),
        sa.Column("instance_id", sa.String(40), primary_key=True),
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("served", sa.Integer(), nullable=False),
        sa.Column("fallbacks", sa.Integer(), nullable=False),
        sa.Column("latency", sa.Text(), nullable=False),
        sa.Column("max_ms", sa.Float(), nullable=False),
        sa.Column("providers", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("status_minutes")
