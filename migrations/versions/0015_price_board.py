"""The open price board: providers' public profiles (a slug, a display name, a website, a
description), every slug a provider ever had (an old slug keeps naming its provider, so nobody can
take it over), and each offer's span (an agent offering a model at a price, from its announcement
to its leaving), from which price history and uptime are read.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provider_profiles",
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("slug", sa.String(40), nullable=False, unique=True),
        sa.Column("name", sa.String(60), nullable=False),
        sa.Column("name_key", sa.String(60), nullable=False, unique=True),
        sa.Column("website", sa.String(200), nullable=True),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("joined_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    op.create_table(
        "provider_slugs",
        sa.Column("slug", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "offer_spans",
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.String(40), nullable=False),
        sa.Column("quantization", sa.String(40), nullable=False),
        sa.Column("price_in", sa.BigInteger(), nullable=False),
        sa.Column("price_out", sa.BigInteger(), nullable=False),
        sa.Column("context_window", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_offer_spans_model_started", "offer_spans", ["model", "started_at"])
    op.create_index("ix_offer_spans_user_started", "offer_spans", ["user_id", "started_at"])
    op.create_index("ix_offer_spans_open", "offer_spans", ["instance_id", "ended_at"])
    op.create_index("ix_offer_spans_ended", "offer_spans", ["ended_at", "seen_at"])


def downgrade() -> None:
    op.drop_table("offer_spans")
    op.drop_table("provider_slugs")
    op.drop_table("provider_profiles")
