"""Key policies: what a consumer key may do (paused, models, price cap, privacy tier, project), kept
as JSON on the key; the request log keeps the key's project.

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


def downgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("project")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("policy")
