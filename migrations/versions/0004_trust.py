"""Trust evidence about agent tokens.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trust_evidence",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("agent_token_id", sa.Integer(), sa.ForeignKey("agent_tokens.id"), nullable=False),
        sa.Column("provider_user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("detail", sa.String(200), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_trust_evidence_token_time", "trust_evidence", ["agent_token_id", "created_at"])
    op.create_index("ix_trust_evidence_provider_time", "trust_evidence", ["provider_user_id", "created_at"])


def downgrade() -> None:
    op.drop_table("trust_evidence")
