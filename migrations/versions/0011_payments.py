"""Money in and out: payments (top-ups through the payment provider) and the events applied,
payout accounts and payouts; escrowed earnings, pending payouts and debt accounts for every user,
and the platform's paid-out account.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)
NEW_USER_KINDS = ("escrow", "payout", "debt")
PAID_OUT = "platform:payouts"


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.create_check_constraint(
            "ck_accounts_payments_sign",
            sa.text("(kind NOT IN ('escrow', 'payout') OR balance >= 0) AND (kind <> 'debt' OR balance <= 0)"),
        )
    accounts = sa.table(
        "accounts",
        sa.column("id", sa.String),
        sa.column("kind", sa.String),
        sa.column("user_id", sa.Integer),
        sa.column("balance", sa.BigInteger),
        sa.column("created_at", _TZ),
    )
    at = datetime.now(UTC)
    user_ids = [row[0] for row in op.get_bind().execute(sa.text("SELECT id FROM users")).all()]
    rows = [
        {"id": f"{kind}:{user_id}", "kind": kind, "user_id": user_id, "balance": 0, "created_at": at}
        for user_id in user_ids
        for kind in NEW_USER_KINDS
    ]
    rows.append({"id": PAID_OUT, "kind": "platform", "user_id": None, "balance": 0, "created_at": at})
    op.bulk_insert(accounts, rows)

    op.create_table(
        "payments",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("session_id", sa.String(255), nullable=True, unique=True),
        sa.Column("payment_intent", sa.String(255), nullable=True),
        sa.Column("paid", sa.BigInteger(), nullable=False),
        sa.Column("refunded", sa.BigInteger(), nullable=False),
        sa.Column("disputed", sa.BigInteger(), nullable=False),
        sa.Column("dispute_stage", sa.Integer(), nullable=False),
        sa.Column("credited", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
    )
    op.create_index("ix_payments_user_created", "payments", ["user_id", "created_at"])
    op.create_index("ix_payments_payment_intent", "payments", ["payment_intent"])
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("received_at", _TZ, nullable=False),
    )
    op.create_table(
        "payout_accounts",
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("account_id", sa.String(255), nullable=False, unique=True),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_table(
        "payouts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("transfer_id", sa.String(255), nullable=True),
        sa.Column("failure", sa.String(500), nullable=True),
        sa.Column("decided_by", sa.String(320), nullable=True),
        sa.Column("requested_at", _TZ, nullable=False),
        sa.Column("decided_at", _TZ, nullable=True),
        sa.Column("finished_at", _TZ, nullable=True),
    )
    op.create_index("ix_payouts_status", "payouts", ["status"])
    op.create_index("ix_payouts_user_requested", "payouts", ["user_id", "requested_at"])


def downgrade() -> None:
    op.drop_table("payouts")
    op.drop_table("payout_accounts")
    op.drop_table("webhook_events")
    op.drop_table("payments")
    op.execute(sa.text("DELETE FROM accounts WHERE kind IN ('escrow', 'payout', 'debt') OR id = 'platform:payouts'"))
    with op.batch_alter_table("accounts") as batch:
        batch.drop_constraint("ck_accounts_payments_sign", type_="check")
