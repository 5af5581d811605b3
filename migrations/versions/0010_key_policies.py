"""Key policies: what a consumer key may do (paused, models, price cap, privacy tier, project, spend
caps), kept as JSON on the key; the request log keeps the key's project, the consumer's ``user``
and ``metadata`` tags, listed by user and time for the audit; key_budgets counts each
key's spend cap handed out to processes per day and month.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("policy", sa.Text(), nullable=True))
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("project", sa.String(100), nullable=True))
        batch.add_column(sa.Column("end_user", sa.String(256), nullable=True))
        batch.add_column(sa.Column("tags", sa.Text(), nullable=True))
        batch.add_column(sa.Column("dlp", sa.Text(), nullable=True))
    op.create_index("ix_request_log_user_created", "request_log", ["user_id", "created_at"])
    op.create_table(
        "key_budgets",
        sa.Column("key_id", sa.Integer(), sa.ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("period", sa.String(10), primary_key=True),
        sa.Column("leased", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("key_budgets")
    op.drop_index("ix_request_log_user_created", "request_log")
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("dlp")
        batch.drop_column("tags")
        batch.drop_column("end_user")
        batch.drop_column("project")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("policy")
