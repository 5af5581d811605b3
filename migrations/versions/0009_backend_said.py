"""What the backend called itself: consumers see the pool's generation id and slug, the request log
keeps the backend's own id and model name for the audit.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("backend_id", sa.String(200), nullable=True))
        batch.add_column(sa.Column("backend_model", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("backend_model")
        batch.drop_column("backend_id")
