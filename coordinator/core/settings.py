"""Coordinator settings, read once from ``POOL_*`` environment variables and passed in."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from shared.money import usd_per_million_to_nano_per_token, usd_to_nano
from shared.protocol import KINDS

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///pool.db"


class SettingsError(ValueError):
    """An environment variable holds a value the coordinator cannot use."""


def _parse_models(value: str) -> dict[str, str]:
    """Parse ``slug=upstream-id,slug2=upstream-id2`` (a bare ``slug`` maps to itself)."""
    mapping: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        slug, _, target = item.partition("=")
        slug, target = slug.strip(), target.strip()
        if not slug:
            raise SettingsError(f"POOL_UPSTREAM_MODELS: empty slug in {item!r}")
        mapping[slug] = target or slug
    return mapping


def _parse_kinds(value: str) -> dict[str, frozenset[str]]:
    """Parse ``slug=kind+kind,slug2=kind`` (job kinds: chat, completion, embedding)."""
    mapping: dict[str, frozenset[str]] = {}
    for item in value.split(","):
        slug, _, kinds = item.strip().partition("=")
        if not slug.strip():
            continue
        named = frozenset(kind.strip() for kind in kinds.split("+") if kind.strip())
        unknown = named - set(KINDS)
        if not named or unknown:
            raise SettingsError(
                f"POOL_UPSTREAM_KINDS: {item.strip()!r} must name kinds among {', '.join(KINDS)}, joined by +"
            )
        mapping[slug.strip()] = named
    return mapping


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None  # replicas: what they share (limits, pushes); PostgreSQL required then
    redis_prefix: str = "pool:"  # the start of every Redis key and channel of this pool
    replica_name: str = ""  # how this replica is named in ``x_pool`` and logs (default: the host's name)
    heartbeat_interval: float = 5.0
    heartbeat_misses: int = 3
    max_body_bytes: int = 4 * 1024 * 1024
    max_frame_bytes: int = 8 * 1024 * 1024
    max_messages_per_second: int = 20_000
    hello_timeout: float = 10.0
    first_chunk_timeout: float = 120.0
    idle_timeout: float = 120.0
    job_deadline: float = 600.0
    upstream_base_url: str | None = None
    upstream_api_key: str | None = None
    upstream_models: dict[str, str] = field(default_factory=dict)
    upstream_kinds: dict[str, frozenset[str]] = field(default_factory=dict)  # per model; unnamed: chat
    upstream_timeout: float = 300.0
    status_window_seconds: float = 900.0
    status_history: float = 86_400.0  # seconds of per-minute status history kept (POOL_STATUS_HISTORY_HOURS)
    status_flush_seconds: float = 10.0  # how often a process writes its open minutes (at most 60)
    no_capacity_retry_after: int = 5
    log_level: str = "INFO"
    # money
    platform_fee: Decimal = Decimal("0.1")
    upstream_price_in: int | None = None  # nano-USD per token consumers pay for fallback requests
    upstream_price_out: int | None = None  # (neither set: the model's pool price, market/upstream.py)
    upstream_cost_in: int = 0  # nano-USD per token the upstream bills the platform
    upstream_cost_out: int = 0
    default_output_tokens: int = 4096
    hold_sweep_interval: float = 5.0
    credit_lease: int = 100_000_000  # nano-USD a process reserves per user at a time (POOL_CREDIT_LEASE_USD)
    credit_lease_idle_seconds: float = 5.0
    ledger_flush_interval: float = 1.0
    instance_lease_seconds: float = 30.0
    directory_reload_seconds: float = 10.0
    trust_threshold: float = 40.0  # agents scoring below get no consumer traffic (0-100)
    trusted_tier_trust: float = 80.0  # a key with privacy `trusted` reaches agents scoring this or more
    trust_half_life: float = 86_400.0  # seconds over which evidence loses half its weight (POOL_TRUST_HALF_LIFE_HOURS)
    new_agent_concurrency: int = 2  # consumer jobs at once for agents not yet trusted
    canary_interval_seconds: float = 30.0  # one verification job this often (0: none)
    admin_token: str | None = None
    public_url: str | None = None  # how users reach the pool (https://pool.example); pages link to it
    # limits
    rate_limit_rpm: int = 600
    rate_limit_tpm: int = 2_000_000
    auth_failures_per_minute: int = 60
    # portal sessions
    jwt_secret: str | None = None
    jwt_issuer: str = "provider-pool"
    jwt_audience: str = "provider-pool-portal"
    jwt_ttl_seconds: int = 3600
    jwt_jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] = ("RS256",)
    jwt_leeway_seconds: float = 0.0
    request_log_interval: float = 1.0
    # hostile parties (issue 15): what an agent or an account may claim, and what identities cost
    default_max_price_in: int = 50_000  # nano-USD per token ($50 per 1M) unless the directory entry says
    default_max_price_out: int = 200_000  # nano-USD per token ($200 per 1M)
    max_connections_per_agent_token: int = 4  # agents one token may have connected at once
    whole_reply_silence: float = 20.0  # seconds a non-stream job may go without a sign of life
    signups_per_hour: int = 5  # new accounts per client address per hour
    signup_approval: bool = False  # new accounts wait for an operator's approval before they can act
    header_timeout: float = 10.0  # seconds a client has to send a request's headers
    body_timeout: float = 30.0  # seconds a client has to send a request's body
    canary_prompts_file: str | None = None  # extra canary prompts, one per line
    canary_confirmations: int = 2  # failed canaries (distinct prompts) before a provider is refunded against
    # shutting down (SIGTERM)
    drain_notice_seconds: float = 0.0  # /readyz fails this long before new requests are refused
    drain_timeout: float = 30.0  # seconds open requests and jobs may take to finish
    # payments (Stripe): top-ups in, payouts out
    stripe_secret_key: str | None = None  # unset: no self-service top-ups or payouts
    stripe_webhook_secret: str | None = None  # the endpoint's signing secret (whsec_…)
    stripe_api_base: str | None = None  # another Stripe API address (a stand-in on loopback in tests)
    topup_min: int = 5_000_000_000  # nano-USD (POOL_TOPUP_MIN_USD)
    topup_max: int = 1_000_000_000_000  # nano-USD (POOL_TOPUP_MAX_USD)
    topup_presets: tuple[int, ...] = (10_000_000_000, 25_000_000_000, 50_000_000_000, 100_000_000_000)
    payout_hold_days: float = 7.0  # earnings stay in escrow this long (a failed canary can claw them back)
    payout_minimum: int = 25_000_000_000  # nano-USD (POOL_PAYOUT_MINIMUM_USD)
    escrow_sweep_seconds: float = 60.0  # how often matured earnings leave escrow
    auto_topup_seconds: float = 5.0  # how often balances are compared with automatic top-up thresholds
    # the open price board and the public endpoints
    price_history_days: float = 90.0  # offer spans that ended longer ago are pruned (open ones stay)
    public_cache_seconds: float = 2.0  # a public view is recomputed at most once per this, however many ask
    public_rpm: int = 120  # requests per minute per client address to the unauthenticated routes
    public_rpm_keyed: int = 1200  # … per consumer key, for a request that brings one
    provider_refresh_seconds: float = 5.0  # how often a process reads providers' profiles changed elsewhere
    trusted_proxies: str = "127.0.0.1"  # addresses whose X-Forwarded-For names the client (a load balancer); "*": any

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: ``os.environ``); bad values raise ``SettingsError``."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, kind in _FIELDS.items():
            variable = f"POOL_{_ENV_NAMES.get(name, name.upper())}"
            raw = env.get(variable)
            if raw is None or raw == "":
                continue
            try:
                values[name] = kind(raw)
            except ValueError as exc:
                raise SettingsError(f"{variable}={raw!r}: {exc}") from None
        settings = cls(**values)  # type: ignore[arg-type]
        if settings.stripe_secret_key and not settings.public_url:
            raise SettingsError(
                "POOL_STRIPE_SECRET_KEY needs POOL_PUBLIC_URL: Checkout and payout onboarding send users back to it"
            )
        if settings.redis_url and not settings.database_url.startswith("postgresql"):
            raise SettingsError(
                "POOL_REDIS_URL runs this coordinator as one replica of several, which must share one "
                "PostgreSQL database: set POOL_DATABASE_URL=postgresql+asyncpg://… (SQLite is one process's)"
            )
        return settings

    @property
    def upstream_price(self) -> tuple[int, int] | None:
        """The operator's price for fallback requests, nano-USD per token in and out (``None``: the
        pool's price per model); one of the two set counts the other as 0."""
        if self.upstream_price_in is None and self.upstream_price_out is None:
            return None
        return self.upstream_price_in or 0, self.upstream_price_out or 0

    @property
    def fee_bps(self) -> int:
        """The platform fee in basis points."""
        return int(self.platform_fee * 10_000)

    @property
    def hold_ttl(self) -> float:
        """How long a hold may stay pending before the sweep releases it whatever its owner."""
        return self.job_deadline + self.idle_timeout + 60

    @property
    def stale_after(self) -> float:
        """Seconds without a heartbeat after which an agent is dropped."""
        return self.heartbeat_interval * self.heartbeat_misses


def _replica_name(raw: str) -> str:
    if len(raw) > 40 or not all(c.isalnum() or c in "-_." for c in raw):
        raise ValueError("at most 40 letters, digits, '-', '_' or '.'")
    return raw


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be positive")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _fraction(raw: str) -> Decimal:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError("not a number") from None
    if not 0 <= value < 1 or value * 10_000 != int(value * 10_000):
        raise ValueError("must be a fraction in [0, 1) with at most 4 decimals")
    return value


ASYMMETRIC_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}


def _asymmetric_algorithms(raw: str) -> tuple[str, ...]:
    """Algorithms for tokens verified with the identity provider's public keys (never none or HS*)."""
    names = tuple(a.strip() for a in raw.split(",") if a.strip())
    bad = [name for name in names if name not in ASYMMETRIC_ALGORITHMS]
    if not names or bad:
        raise ValueError(f"choose from {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}")
    return names


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _public_url(raw: str) -> str:
    if not raw.startswith(("https://", "http://")) or any(c in raw for c in " \"'<>"):
        raise ValueError("must be an http(s) URL such as https://pool.example")
    return raw.rstrip("/")


def _at_most(value: float, limit: float) -> float:
    if value > limit:
        raise ValueError(f"must be at most {limit:g}")
    return value


def _trust_score(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 100:
        raise ValueError("must be between 0 and 100")
    return value


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
        raise ValueError("must be 1/0, true/false, yes/no or on/off")
    return value in {"1", "true", "yes", "on"}


_ENV_NAMES = {
    "credit_lease": "CREDIT_LEASE_USD",
    "trust_half_life": "TRUST_HALF_LIFE_HOURS",
    "status_history": "STATUS_HISTORY_HOURS",
    "default_max_price_in": "MAX_PRICE_IN",
    "default_max_price_out": "MAX_PRICE_OUT",
    "topup_min": "TOPUP_MIN_USD",
    "topup_max": "TOPUP_MAX_USD",
    "topup_presets": "TOPUP_PRESETS_USD",
    "payout_minimum": "PAYOUT_MINIMUM_USD",
}  # where the variable's name says its unit

_FIELDS: dict[str, Callable[[str], object]] = {
    "database_url": str,
    "redis_url": _redis_url,
    "redis_prefix": str,
    "replica_name": _replica_name,
    "heartbeat_interval": _positive_float,
    "heartbeat_misses": _positive_int,
    "max_body_bytes": _positive_int,
    "max_frame_bytes": _positive_int,
    "max_messages_per_second": _positive_int,
    "hello_timeout": _positive_float,
    "first_chunk_timeout": _positive_float,
    "idle_timeout": _positive_float,
    "job_deadline": _positive_float,
    "upstream_base_url": lambda raw: raw.rstrip("/"),
    "upstream_api_key": str,
    "upstream_models": _parse_models,
    "upstream_kinds": _parse_kinds,
    "upstream_timeout": _positive_float,
    "status_window_seconds": _positive_float,
    "status_history": lambda raw: _positive_float(raw) * 3600,
    "status_flush_seconds": lambda raw: _at_most(_positive_float(raw), 60.0),
    "no_capacity_retry_after": _positive_int,
    "log_level": str.upper,
    "platform_fee": _fraction,
    "upstream_price_in": usd_per_million_to_nano_per_token,
    "upstream_price_out": usd_per_million_to_nano_per_token,
    "upstream_cost_in": usd_per_million_to_nano_per_token,
    "upstream_cost_out": usd_per_million_to_nano_per_token,
    "default_output_tokens": _positive_int,
    "hold_sweep_interval": _positive_float,
    "credit_lease": lambda raw: usd_to_nano(raw, 1_000_000),
    "credit_lease_idle_seconds": _positive_float,
    "ledger_flush_interval": _positive_float,
    "instance_lease_seconds": _positive_float,
    "directory_reload_seconds": _positive_float,
    "trust_threshold": _trust_score,
    "trusted_tier_trust": _trust_score,
    "trust_half_life": lambda raw: _positive_float(raw) * 3600,
    "new_agent_concurrency": _positive_int,
    "canary_interval_seconds": _non_negative_float,
    "admin_token": str,
    "public_url": _public_url,
    "rate_limit_rpm": _positive_int,
    "rate_limit_tpm": _positive_int,
    "auth_failures_per_minute": _positive_int,
    "jwt_secret": str,
    "jwt_issuer": str,
    "jwt_audience": str,
    "jwt_ttl_seconds": _positive_int,
    "jwt_jwks_url": str,
    "jwt_algorithms": lambda raw: _asymmetric_algorithms(raw),
    "jwt_leeway_seconds": _non_negative_float,
    "request_log_interval": _positive_float,
    "default_max_price_in": usd_per_million_to_nano_per_token,
    "default_max_price_out": usd_per_million_to_nano_per_token,
    "max_connections_per_agent_token": _positive_int,
    "whole_reply_silence": _positive_float,
    "signups_per_hour": _positive_int,
    "signup_approval": _flag,
    "header_timeout": _positive_float,
    "body_timeout": _positive_float,
    "canary_prompts_file": str,
    "canary_confirmations": _positive_int,
    "drain_notice_seconds": _non_negative_float,
    "drain_timeout": _positive_float,
    "stripe_secret_key": str,
    "stripe_webhook_secret": str,
    "stripe_api_base": _public_url,
    "topup_min": lambda raw: usd_to_nano(raw, 1_000_000),
    "topup_max": lambda raw: usd_to_nano(raw, 1_000_000),
    "topup_presets": lambda raw: tuple(usd_to_nano(part.strip(), 1_000_000) for part in raw.split(",") if part.strip()),
    "payout_hold_days": _non_negative_float,
    "payout_minimum": lambda raw: usd_to_nano(raw, 1_000_000),
    "escrow_sweep_seconds": _positive_float,
    "auto_topup_seconds": _positive_float,
    "price_history_days": _positive_float,
    "public_cache_seconds": _positive_float,
    "public_rpm": _positive_int,
    "public_rpm_keyed": _positive_int,
    "provider_refresh_seconds": _positive_float,
    "trusted_proxies": str,
}
