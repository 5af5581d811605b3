"""Passwords, key limits, ledger, holds, top-ups, coordinator instances, request log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)
PLATFORM_ACCOUNTS = ("platform:fees", "platform:upstream", "platform:funding")
USER_ACCOUNT_KINDS = ("wallet", "held", "earnings")


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("password_hash", sa.String(200), nullable=True))
        batch.add_column(sa.Column("subject", sa.String(255), nullable=True))
        batch.create_unique_constraint("uq_users_subject", ["subject"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("last_used_at", _TZ, nullable=True))
        batch.add_column(sa.Column("rpm_limit", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tpm_limit", sa.Integer(), nullable=True))
    with op.batch_alter_table("agent_tokens") as batch:
        batch.add_column(sa.Column("last_used_at", _TZ, nullable=True))

    accounts = op.create_table(
        "accounts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=True),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.CheckConstraint(
            "kind NOT IN ('wallet', 'held', 'earnings') OR balance >= 0", name="ck_accounts_not_negative"
        ),
    )
    op.create_index("ix_accounts_user_id", "accounts", ["user_id"])
    op.create_table(
        "ledger_transactions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(200), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_index("ix_ledger_transactions_ref", "ledger_transactions", ["ref"])
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("tx_id", sa.String(40), sa.ForeignKey("ledger_transactions.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_ledger_entries_tx_id", "ledger_entries", ["tx_id"])
    op.create_index("ix_ledger_entries_account_id", "ledger_entries", ["account_id"])
    op.create_table(
        "holds",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("owner", sa.String(40), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("expires_at", _TZ, nullable=False),
        sa.Column("resolved_at", _TZ, nullable=True),
        sa.Column("charged", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(40), nullable=True),
    )
    op.create_index("ix_holds_status_owner", "holds", ["status", "owner"])
    op.create_table(
        "topups",
        sa.Column("idempotency_key", sa.String(200), primary_key=True),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("tx_id", sa.String(40), sa.ForeignKey("ledger_transactions.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_table(
        "coordinator_instances",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("started_at", _TZ, nullable=False),
        sa.Column("seen_at", _TZ, nullable=False),
    )
    op.create_index("ix_coordinator_instances_seen_at", "coordinator_instances", ["seen_at"])
    op.create_table(
        "request_log",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("provider_user_id", sa.Integer(), nullable=True),
        sa.Column("agent_id", sa.String(40), nullable=True),
        sa.Column("fallback", sa.Boolean(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(40), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("ttft_ms", sa.Integer(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("reported_prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("reported_completion_tokens", sa.Integer(), nullable=True),
        sa.Column("usage_capped", sa.Boolean(), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("provider_earned", sa.BigInteger(), nullable=False),
        sa.Column("platform_fee", sa.BigInteger(), nullable=False),
        sa.Column("upstream_cost", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_request_log_user_day", "request_log", ["user_id", "day"])
    op.create_index("ix_request_log_provider_day", "request_log", ["provider_user_id", "day"])

    _forbid_ledger_changes()

    now = datetime.now(UTC)
    rows = [
        {"id": name, "kind": "platform", "user_id": None, "balance": 0, "created_at": now} for name in PLATFORM_ACCOUNTS
    ]
    users = op.get_bind().execute(sa.text("SELECT id FROM users")).scalars().all()
    rows += [
        {"id": f"{kind}:{uid}", "kind": kind, "user_id": uid, "balance": 0, "created_at": now}
        for uid in users
        for kind in USER_ACCOUNT_KINDS
    ]
    op.bulk_insert(accounts, rows)


def _forbid_ledger_changes() -> None:
    """Entries and transactions are immutable: the database refuses UPDATE and DELETE on them."""
    dialect = op.get_bind().dialect.name
    for table in ("ledger_entries", "ledger_transactions"):
        if dialect == "postgresql":
            op.execute(
                f"CREATE FUNCTION {table}_immutable() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN RAISE EXCEPTION '{table} is append-only'; END $$"
            )
            op.execute(
                f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_immutable()"
            )
        elif dialect == "sqlite":
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in ("ledger_entries", "ledger_transactions"):
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {table}_immutable()")
    for table in ("request_log", "coordinator_instances", "topups", "holds", "ledger_entries", "ledger_transactions"):
        op.drop_table(table)
    op.drop_table("accounts")
    with op.batch_alter_table("agent_tokens") as batch:
        batch.drop_column("last_used_at")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("tpm_limit")
        batch.drop_column("rpm_limit")
        batch.drop_column("last_used_at")
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_subject", type_="unique")
        batch.drop_column("subject")
        batch.drop_column("password_hash")
