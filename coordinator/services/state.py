"""Everything a running coordinator holds in memory, built once by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from coordinator.core.cluster import Cluster
from coordinator.core.ratelimit import AddressLimits, PoolFailureLimits, PoolKeyLimits
from coordinator.core.settings import Settings
from coordinator.core.viewcache import ViewCache
from coordinator.identity.auth import SecretCache
from coordinator.identity.formtokens import FormTokens
from coordinator.identity.portal_tokens import Passwords, SessionTokens
from coordinator.identity.providers import ProviderBook
from coordinator.market.catalog import Directory
from coordinator.market.mirror import Mirror
from coordinator.market.registry import Registry
from coordinator.market.upstream import Upstream
from coordinator.money.budgets import KeyBudgets
from coordinator.money.clawback import Clawback
from coordinator.money.leases import CreditLeases
from coordinator.money.requestlog import RequestLog
from coordinator.services.payments import Payments
from coordinator.serving.dispatch import Dispatcher
from coordinator.serving.relay import Relay
from coordinator.serving.verify import Verifier
from coordinator.status.history import History
from coordinator.status.metrics import Metrics
from coordinator.status.offerlog import OfferLog
from coordinator.status.stats import RequestStats, Window
from coordinator.trust.scores import TrustBook


@dataclass
class PoolState:
    settings: Settings
    engine: AsyncEngine
    db_sessions: async_sessionmaker[AsyncSession]
    consumer_keys: SecretCache
    agent_tokens: SecretCache
    registry: Registry
    upstream: Upstream
    dispatcher: Dispatcher
    stats: RequestStats
    history: History
    requests: RequestLog
    key_limits: PoolKeyLimits
    auth_failures: PoolFailureLimits
    leases: CreditLeases
    budgets: KeyBudgets  # keys' spend caps, leased from the database like credit
    portal: SessionTokens
    passwords: Passwords
    signups: AddressLimits
    forms: FormTokens
    directory: Directory
    trust: TrustBook
    verifier: Verifier
    clawback: Clawback
    metrics: Metrics
    cluster: Cluster  # what replicas share through Redis (nothing without POOL_REDIS_URL)
    payments: Payments  # the payment provider: top-ups in, payouts out (off without POOL_STRIPE_SECRET_KEY)
    schema_head: str | None  # the newest migration this code ships (``/readyz`` compares)
    providers: ProviderBook  # providers' public profiles and slugs, read from the database every few seconds
    offer_log: OfferLog  # offers' spans: price history and uptime
    views: ViewCache  # the public views, recomputed at most once per interval
    public_limits: AddressLimits  # the public routes, per client address
    public_key_limits: AddressLimits  # … per consumer key, for requests that bring one
    replica: str | None = None  # this replica's name (``None``: no replicas, no Redis)
    mirror: Mirror | None = None  # the other replicas' agents in the registry, ours published
    relay: Relay | None = None  # jobs between replicas
    pool_window: Window | None = None  # every replica's status window merged, read once a second
    draining: bool = False  # shutting down: ``/readyz`` fails so load balancers send nothing new
    refusing: bool = False  # draining, past the notice: new chat requests and agents are turned away


def provide_pool(state: State) -> PoolState:
    """The dependency handlers declare as ``pool: PoolState`` (registered by ``create_app``)."""
    pool: PoolState = state.pool
    return pool


def pool_of(connection: ASGIConnection[Any, Any, Any, Any]) -> PoolState:
    """The pool, for what runs outside a handler's dependencies (guards, hooks, cookie helpers)."""
    return provide_pool(connection.app.state)
