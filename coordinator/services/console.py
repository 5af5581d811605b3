"""What the operator console shows and does: users with their balances, credit adjustments with a
reason, connected agents and their trust, and the ledger's health (``money/books.py``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core.models import Account, User
from coordinator.money import books, ledger
from coordinator.services.state import PoolState

log = logging.getLogger(__name__)
_accounts = Account.__table__
_users = User.__table__
assert isinstance(_accounts, Table) and isinstance(_users, Table)

PAGE = 100
KINDS = ("wallet", "held", "debt", "escrow", "earnings", "payout")


@dataclass(frozen=True)
class UserRow:
    id: int
    email: str
    created_at: datetime
    role: str | None
    wallet: int
    held: int
    owed: int
    escrowed: int
    earnings: int
    paying: int


async def users_page(engine: AsyncEngine, search: str, offset: int) -> tuple[list[UserRow], bool]:
    """Users whose email contains ``search``, newest first, with their balances; and whether more follow."""
    query = select(_users.c.id, _users.c.email, _users.c.created_at, _users.c.role).order_by(_users.c.id.desc())
    if search:
        query = query.where(func.lower(_users.c.email).contains(search.lower(), autoescape=True))
    async with engine.connect() as conn:
        found = (await conn.execute(query.offset(offset).limit(PAGE + 1))).all()
        ids = [row.id for row in found[:PAGE]]
        money: dict[tuple[int, str], int] = {}
        if ids:
            rows = await conn.execute(
                select(_accounts.c.user_id, _accounts.c.kind, _accounts.c.balance).where(_accounts.c.user_id.in_(ids))
            )
            money = {(int(user), str(kind)): int(balance) for user, kind, balance in rows.all()}
    listed = [
        UserRow(
            row.id,
            row.email,
            row.created_at,
            row.role,
            *(abs(money.get((row.id, kind), 0)) for kind in KINDS),
        )
        for row in found[:PAGE]
    ]
    return listed, len(found) > PAGE


async def adjust(pool: PoolState, user_id: int, amount: int, reason: str, operator: str) -> str:
    """Give or take credit with a reason; the ledger transaction. ``InsufficientCredits`` when
    taking more than the wallet holds (the operator sees what it holds)."""
    await pool.leases.flush(close_all=True, user_id=user_id)  # a lease's credit back in the wallet first
    async with pool.engine.begin() as conn:
        if await conn.scalar(select(_users.c.id).where(_users.c.id == user_id)) is None:
            raise LookupError(f"no user {user_id}")
        tx = await ledger.adjust(conn, user_id, amount, f"by {operator}: {reason}"[:200])
    log.info("credits adjusted", extra={"user": user_id, "amount_nano": amount, "operator": operator, "tx": tx})
    return tx


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    provider: int
    token_id: int
    models: str
    trust: float
    in_flight: int
    max_concurrency: int
    draining: bool
    replica: str | None
    seen_ago: float


def agents(pool: PoolState) -> list[AgentRow]:
    """Every agent in the pool (other replicas' too), least trusted first."""
    now = time.monotonic()
    rows = [
        AgentRow(
            a.agent_id,
            a.user_id,
            a.token_id,
            ", ".join(sorted(a.models)),
            a.trust,
            a.in_flight,
            a.max_concurrency,
            a.draining,
            a.replica,
            max(0.0, now - a.last_seen),
        )
        for a in pool.registry.agents()
    ]
    return sorted(rows, key=lambda r: (r.trust, r.agent_id))


@dataclass(frozen=True)
class Health:
    problems: list[str]
    checked_at: datetime
    seconds: float
    totals: dict[str, int]  # users' balances summed per account kind; each platform account's own


async def ledger_health(engine: AsyncEngine) -> Health:
    """Run the ledger's invariant checks now, and sum balances per account kind."""
    started = time.perf_counter()
    problems = await books.ledger_problems(engine)
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(_accounts.c.kind, func.sum(_accounts.c.balance))
            .where(_accounts.c.kind != "platform")
            .group_by(_accounts.c.kind)
        )
        totals = {str(kind): int(total or 0) for kind, total in rows.all()}
        platform = await conn.execute(select(_accounts.c.id, _accounts.c.balance).where(_accounts.c.kind == "platform"))
        totals.update({str(account): int(balance) for account, balance in platform.all()})
    return Health(problems, ledger.now(), time.perf_counter() - started, totals)
