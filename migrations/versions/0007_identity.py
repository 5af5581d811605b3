"""Identity that costs something (issue 15): accounts an operator has approved, and portal sessions
ended before their expiry.

``users.approved`` is true for every existing account (they were usable before approval existed);
``revoked_sessions`` holds the SHA-256 of each logged-out session's ``jti`` until the token expires.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite too): a batch would copy ``users``, which the ledger's rows reference.
    op.add_column("users", sa.Column("approved", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.create_table(
        "revoked_sessions",
        sa.Column("jti_digest", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_revoked_sessions_expires_at", "revoked_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_revoked_sessions_expires_at", "revoked_sessions")
    op.drop_table("revoked_sessions")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("approved")
