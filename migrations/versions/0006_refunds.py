"""Refunds: a request refunded is marked in the request log, and refunded at most once. And status
history rows take model names as long as the request log's (upstream slugs can be longer than 64).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("status_minutes") as batch:
        batch.alter_column("model", existing_type=sa.String(64), type_=sa.String(200), existing_nullable=False)
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("refunded", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index(
        "ux_ledger_refund_ref",
        "ledger_transactions",
        ["ref"],
        unique=True,
        sqlite_where=sa.text("kind = 'refund'"),
        postgresql_where=sa.text("kind = 'refund'"),
    )


def downgrade() -> None:
    op.drop_index("ux_ledger_refund_ref", "ledger_transactions")
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("refunded")
    with op.batch_alter_table("status_minutes") as batch:
        batch.alter_column("model", existing_type=sa.String(200), type_=sa.String(64), existing_nullable=False)
