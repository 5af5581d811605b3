"""Everything a running coordinator holds in memory, built once by ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from coordinator.auth import SecretCache
from coordinator.catalog import Directory
from coordinator.clawback import Clawback
from coordinator.dispatch import Dispatcher
from coordinator.formtokens import FormTokens
from coordinator.history import History
from coordinator.leases import CreditLeases
from coordinator.portal_tokens import Passwords, SessionTokens
from coordinator.ratelimit import AddressLimits, FailureLimits, KeyLimits
from coordinator.registry import Registry
from coordinator.requestlog import RequestLog
from coordinator.settings import Settings
from coordinator.stats import RequestStats
from coordinator.trust import TrustBook
from coordinator.upstream import Upstream
from coordinator.verify import Verifier


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
    key_limits: KeyLimits
    auth_failures: FailureLimits
    leases: CreditLeases
    portal: SessionTokens
    passwords: Passwords
    signups: AddressLimits
    forms: FormTokens
    directory: Directory
    trust: TrustBook
    verifier: Verifier
    clawback: Clawback


def provide_pool(state: State) -> PoolState:
    """The dependency handlers declare as ``pool: PoolState`` (registered by ``create_app``)."""
    pool: PoolState = state.pool
    return pool


def pool_of(connection: ASGIConnection[Any, Any, Any, Any]) -> PoolState:
    """The pool, for what runs outside a handler's dependencies (guards, hooks, cookie helpers)."""
    return provide_pool(connection.app.state)
