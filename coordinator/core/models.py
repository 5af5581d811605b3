"""SQLAlchemy 2 models. Schema changes go through Alembic migrations in ``migrations/``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp on every database (SQLite returns naive values: they are UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value  # type: ignore[no-any-return]


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    password_hash: Mapped[str | None] = mapped_column(String(200), default=None)
    subject: Mapped[str | None] = mapped_column(String(255), unique=True, default=None)  # external IdP ``sub``
    approved: Mapped[bool] = mapped_column(Boolean, default=True)  # False: waits for an operator (signup approval)
    vouched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)  # a reference source
    role: Mapped[str | None] = mapped_column(String(16), default=None)  # "admin": the operator console


class RevokedSession(Base):
    """A portal session ended before its expiry (logout): refused until ``expires_at``, then pruned."""

    __tablename__ = "revoked_sessions"

    jti_digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the token's ``jti``
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class ApiKey(Base):
    """A consumer key (``pool_live_…``), stored as its SHA-256 digest."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(32))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    rpm_limit: Mapped[int | None] = mapped_column(Integer, default=None)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, default=None)
    policy: Mapped[str | None] = mapped_column(Text(), default=None)  # identity/policies.py, as JSON


class KeyBudgetRow(Base):
    """Per consumer key and period (``YYYY-MM-DD`` or ``YYYY-MM``, UTC), the nano-USD of its spend
    cap handed out to coordinator processes (``money/budgets.py``); never more than the cap."""

    __tablename__ = "key_budgets"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[str] = mapped_column(String(10), primary_key=True)
    leased: Mapped[int] = mapped_column(BigInteger, default=0)


class AgentToken(Base):
    """A provider's agent token (``pool_agent_…``), stored as its SHA-256 digest."""

    __tablename__ = "agent_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(32))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


# --- money (DESIGN §5): written only by coordinator/money/ledger.py ------------------------------------


class Account(Base):
    """A ledger account; ``balance`` is the sum of its entries, kept in step by the same transaction.

    Ids are readable and derived from the owner (``wallet:42``, ``platform:fees``), so the hot path
    needs no lookup to find them.
    """

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("kind NOT IN ('wallet', 'held', 'earnings') OR balance >= 0", name="ck_accounts_not_negative"),
        # Escrowed earnings and pending payouts are never negative; a debt is what the user owes
        # the platform, so it is never positive (0011).
        CheckConstraint(
            "(kind NOT IN ('escrow', 'payout') OR balance >= 0) AND (kind <> 'debt' OR balance <= 0)",
            name="ck_accounts_payments_sign",
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LedgerTransaction(Base):
    """One movement of money; its entries sum to zero. Never updated or deleted."""

    __tablename__ = "ledger_transactions"
    __table_args__ = (
        # A request is refunded at most once, whatever the processes do.
        Index(
            "ux_ledger_refund_ref",
            "ref",
            unique=True,
            sqlite_where=text("kind = 'refund'"),
            postgresql_where=text("kind = 'refund'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str | None] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tx_id: Mapped[str] = mapped_column(ForeignKey("ledger_transactions.id", ondelete="RESTRICT"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)


class Hold(Base):
    """Credits reserved for a process's credit lease: charged while ``pending``, released exactly
    once (``pending`` → ``released``; rows of older versions may say ``settled``)."""

    __tablename__ = "holds"
    __table_args__ = (Index("ix_holds_status_owner", "status", "owner"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the request id
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    key_id: Mapped[int | None] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(10))
    owner: Mapped[str] = mapped_column(String(40))  # the coordinator instance serving the request
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str | None] = mapped_column(String(40), default=None)


class Topup(Base):
    """An idempotent credit grant: the same key always names the same grant."""

    __tablename__ = "topups"

    idempotency_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_digest: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    amount: Mapped[int] = mapped_column(BigInteger)
    tx_id: Mapped[str] = mapped_column(ForeignKey("ledger_transactions.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Payment(Base):
    """Money a user paid through the payment provider (a Checkout session, an off-session charge).

    The provider's events only ever raise what is known of it (``paid``, ``refunded``, ``disputed``),
    whatever order they come in; ``credited`` is what the ledger has given the wallet for it so far,
    and each event posts the difference (``ledger.settle_payment``)."""

    __tablename__ = "payments"
    __table_args__ = (Index("ix_payments_user_created", "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # pay_…, in the provider's metadata
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))  # checkout | auto
    status: Mapped[str] = mapped_column(String(16))  # open | paid | expired | failed
    amount: Mapped[int] = mapped_column(BigInteger)  # nano-USD asked for
    session_id: Mapped[str | None] = mapped_column(String(255), unique=True, default=None)
    payment_intent: Mapped[str | None] = mapped_column(String(255), index=True, default=None)
    paid: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded: Mapped[int] = mapped_column(BigInteger, default=0)  # cumulative, as the provider reports it
    disputed: Mapped[int] = mapped_column(BigInteger, default=0)  # taken by an open or lost dispute
    dispute_stage: Mapped[int] = mapped_column(Integer, default=0)  # 0 none, 1 open, 2 closed
    credited: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AutoTopup(Base):
    """A user's automatic top-up: charge ``amount`` to the saved payment method when the balance
    falls under ``threshold``. ``armed`` is cleared by the one process that fires a charge and set
    again only once the balance is back at the threshold: one charge per crossing."""

    __tablename__ = "auto_topups"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(255))
    payment_method: Mapped[str] = mapped_column(String(255))
    threshold: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    armed: Mapped[bool] = mapped_column(Boolean, default=True)
    fired: Mapped[int] = mapped_column(Integer, default=0)  # charges fired: the next one's idempotency key
    last_error: Mapped[str | None] = mapped_column(String(500), default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookEvent(Base):
    """A payment provider's event already applied: each is applied once, however often it comes."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PayoutAccount(Base):
    """A provider's connected payout account at the payment provider."""

    __tablename__ = "payout_accounts"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PayoutRow(Base):
    """A provider's payout: ``requested`` → ``approved`` (an operator) → ``paid``, or ``rejected`` /
    ``failed`` (the amount back in its earnings). Every step is one ledger transaction."""

    __tablename__ = "payouts"
    __table_args__ = (
        Index("ix_payouts_status", "status"),
        Index("ix_payouts_user_requested", "user_id", "requested_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # po_…, the transfer's idempotency key
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    destination: Mapped[str] = mapped_column(String(255))
    transfer_id: Mapped[str | None] = mapped_column(String(255), default=None)
    failure: Mapped[str | None] = mapped_column(String(500), default=None)
    decided_by: Mapped[str | None] = mapped_column(String(320), default=None)  # the operator
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class CanaryVouch(Base):
    """When a canary last passed for an agent token and model: its jobs that ended before stand,
    whatever restarts came between (``money/clawback.py``)."""

    __tablename__ = "canary_vouches"

    agent_token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    vouched_at: Mapped[datetime] = mapped_column(UTCDateTime())


class CoordinatorInstance(Base):
    """A running coordinator process; its holds are orphaned once it stops renewing ``seen_at``."""

    __tablename__ = "coordinator_instances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class RequestLogRow(Base):
    """One consumer request as it ended. Never prompts, never keys."""

    __tablename__ = "request_log"
    __table_args__ = (
        Index("ix_request_log_user_day", "user_id", "day"),
        Index("ix_request_log_user_created", "user_id", "created_at"),  # the audit list, newest first
        Index("ix_request_log_provider_day", "provider_user_id", "day"),
        Index("ix_request_log_token_model_created", "agent_token_id", "model", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the request id
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    day: Mapped[str] = mapped_column(String(10))  # UTC date, YYYY-MM-DD: portable grouping
    user_id: Mapped[int | None] = mapped_column(Integer)
    key_id: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    provider_user_id: Mapped[int | None] = mapped_column(Integer)
    agent_id: Mapped[str | None] = mapped_column(String(40))
    fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[int] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(40))
    latency_ms: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[int | None] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reported_prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    reported_completion_tokens: Mapped[int | None] = mapped_column(Integer)
    usage_capped: Mapped[bool] = mapped_column(Boolean, default=False)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)
    provider_earned: Mapped[int] = mapped_column(BigInteger, default=0)
    platform_fee: Mapped[int] = mapped_column(BigInteger, default=0)
    upstream_cost: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded: Mapped[bool] = mapped_column(Boolean, default=False)  # a failed canary gave the cost back
    backend_id: Mapped[str | None] = mapped_column(String(200))  # what the backend called the reply
    backend_model: Mapped[str | None] = mapped_column(String(200))  # and itself; consumers see the slug
    project: Mapped[str | None] = mapped_column(String(100))  # the key's policy's project label
    end_user: Mapped[str | None] = mapped_column(String(256))  # the request's OpenAI ``user`` field
    tags: Mapped[str | None] = mapped_column(Text())  # the request's ``metadata``, as JSON
    dlp: Mapped[str | None] = mapped_column(Text())  # what data protection found: detector -> count, JSON
    agent_token_id: Mapped[int | None] = mapped_column(Integer)  # the agent's token (refunds after a restart)
    # the API it came through: chat, completion, embedding (their job kinds), responses, messages (chat jobs)
    kind: Mapped[str] = mapped_column(String(20), default="chat", server_default="chat")


class DirectoryModel(Base):
    """An operator's edit of the model directory: an entry (JSON) that replaces or adds to the
    shipped ``catalog.toml``, or, with ``removed``, hides one."""

    __tablename__ = "directory_models"

    slug: Mapped[str] = mapped_column(String(64), primary_key=True)
    entry: Mapped[str] = mapped_column(Text)
    removed: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TrustEvidenceRow(Base):
    """One piece of evidence about an agent token (a run of ``completed`` jobs is one row with a
    count); trust scores are computed from these, so each one can be explained."""

    __tablename__ = "trust_evidence"
    __table_args__ = (
        Index("ix_trust_evidence_token_time", "agent_token_id", "created_at"),
        Index("ix_trust_evidence_provider_time", "provider_user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_token_id: Mapped[int] = mapped_column(ForeignKey("agent_tokens.id"))
    provider_user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(40))
    weight: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(Integer, default=1)
    detail: Mapped[str] = mapped_column(String(200), default="")
    job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StatusMinuteRow(Base):
    """One coordinator process's view of one minute of one model (``*``: the whole pool), merged
    with the other processes' rows when read; see ``coordinator/status/history.py``."""

    __tablename__ = "status_minutes"

    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix seconds at its start
    instance_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(Integer)
    served: Mapped[int] = mapped_column(Integer)
    fallbacks: Mapped[int] = mapped_column(Integer)
    latency: Mapped[str] = mapped_column(Text)  # JSON {bucket: count}
    max_ms: Mapped[float] = mapped_column(Float)
    providers: Mapped[str] = mapped_column(Text)  # JSON [provider user id, …]


class CanaryReference(Base):
    """One trusted source's answer to a canary prompt (``prompt``: its digest, never its text), which
    judges agents' answers: ``source`` is ``platform`` (the upstream) or ``user:<id>`` (a provider the
    operator vouches for; its rows go when it is unvouched)."""

    __tablename__ = "canary_references"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    quantization: Mapped[str] = mapped_column(String(32), primary_key=True)  # "": none, or not one listed
    prompt: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    complete: Mapped[bool] = mapped_column(Boolean)  # the model ended it (else a token limit cut it)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ProviderProfile(Base):
    """A provider's public face: its current slug, display name (unique ignoring case and spacing:
    ``name_key``), optional website and description, and when it first offered a model."""

    __tablename__ = "provider_profiles"

    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    slug: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(60))
    name_key: Mapped[str] = mapped_column(String(60), unique=True)
    website: Mapped[str | None] = mapped_column(String(200), default=None)
    description: Mapped[str | None] = mapped_column(String(500), default=None)
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class ProviderSlug(Base):
    """Every slug a provider has had: an old slug still names it and is never given to another."""

    __tablename__ = "provider_slugs"

    slug: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class OfferSpan(Base):
    """One agent offering one model at one price, from its announcement to its leaving (``ended_at``
    open while it stays). The replica holding the agent renews ``seen_at``; a span whose replica
    died is ended at its last ``seen_at`` by another's sweep. Price history and uptime read these."""

    __tablename__ = "offer_spans"
    __table_args__ = (
        Index("ix_offer_spans_model_started", "model", "started_at"),
        Index("ix_offer_spans_user_started", "user_id", "started_at"),
        Index("ix_offer_spans_open", "instance_id", "ended_at"),
        Index("ix_offer_spans_ended", "ended_at", "seen_at"),  # the sweep: open spans gone silent, old ones
    )

    agent_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer)
    instance_id: Mapped[str] = mapped_column(String(40))
    quantization: Mapped[str] = mapped_column(String(40))
    price_in: Mapped[int] = mapped_column(BigInteger)  # nano-USD per token
    price_out: Mapped[int] = mapped_column(BigInteger)
    context_window: Mapped[int | None] = mapped_column(Integer, default=None)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
