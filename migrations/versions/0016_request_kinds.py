"""Each logged request says which API it came through (chat, completion, embedding, responses,
messages), so usage and the portal can break spend down by it. Rows from before are chat.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("kind", sa.String(20), nullable=False, server_default="chat"))


def downgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("kind")
