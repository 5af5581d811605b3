"""Durable clawback: the request log names the agent token that served each request, and the last
passed canary per token and model is kept, so a failed canary refunds jobs served before a restart.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("agent_token_id", sa.Integer(), nullable=True))
    op.create_index("ix_request_log_token_model_created", "request_log", ["agent_token_id", "model", "created_at"])
    op.create_table(
        "canary_vouches",
        sa.Column("agent_token_id", sa.Integer(), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("vouched_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("canary_vouches")
    op.drop_index("ix_request_log_token_model_created", table_name="request_log")
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("agent_token_id")
