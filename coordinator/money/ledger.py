"""The ledger's core (DESIGN §5): accounts, grants, holds, charges, releases, refunds, debt.
``payments.py`` (money paid in) and ``payouts.py`` (escrow and money paid out) post through
:func:`post` here; nothing else writes money tables.

Every movement is one ledger transaction whose entries sum to zero, written in the same database
transaction as the balances it changes. Spending is a conditional update (``balance >= :amount``),
never read-then-write. A hold resolves exactly once because resolving it is a conditional update of
its status from ``pending``: whichever release (a lease closing, the sweep) comes first wins, the
rest are no-ops; a charge needs the hold pending, so none lands after its release. Account rows
are always updated in id order, so concurrent transactions cannot deadlock.

A provider's share of a charge is escrowed (``escrow:<user>``) and matures into its earnings
(``earnings:<user>``) after the hold period (``payouts.mature``). A user who owes the platform
(a payment refunded or disputed after its credit was spent) has a negative ``debt:<user>``; every
credit to the wallet pays it first, and the wallet stays empty until it is paid.

InsufficientCredits   a hold larger than the wallet
IdempotencyConflict   a top-up key reused with a different body
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Table, and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from coordinator.core.models import (
    Account,
    CoordinatorInstance,
    Hold,
    LedgerEntry,
    LedgerTransaction,
    RequestLogRow,
    Topup,
)

PENDING, RELEASED = "pending", "released"  # rows of older versions may say "settled"
PLATFORM_FEES = "platform:fees"
UPSTREAM_COSTS = "platform:upstream"
FUNDING = "platform:funding"
PAID_OUT = "platform:payouts"
USER_ACCOUNT_KINDS = ("wallet", "held", "earnings", "escrow", "payout", "debt")
BASIS_POINTS = 10_000
MAX_GRANT_USD = 1_000_000  # one grant, a guard against typos

_accounts = cast(Table, Account.__table__)
_entries = cast(Table, LedgerEntry.__table__)
_transactions = cast(Table, LedgerTransaction.__table__)
_request_log = cast(Table, RequestLogRow.__table__)
_holds = cast(Table, Hold.__table__)
_topups = cast(Table, Topup.__table__)
_instances = cast(Table, CoordinatorInstance.__table__)


def wallet(user_id: int) -> str:
    return f"wallet:{user_id}"


def held(user_id: int) -> str:
    return f"held:{user_id}"


def earnings(user_id: int) -> str:
    """A provider's matured earnings: what it may be paid out."""
    return f"earnings:{user_id}"


def escrow(user_id: int) -> str:
    """A provider's earnings still in escrow (a failed canary can take them back)."""
    return f"escrow:{user_id}"


def payout_pending(user_id: int) -> str:
    """A provider's payouts requested and not yet paid."""
    return f"payout:{user_id}"


def debt(user_id: int) -> str:
    """What a user owes the platform, as a negative balance."""
    return f"debt:{user_id}"


class InsufficientCredits(Exception):
    def __init__(self, needed: int, available: int, owed: int = 0) -> None:
        super().__init__(f"needed {needed} nano-USD, available {available}, owed {owed}")
        self.needed = needed
        self.available = available
        self.owed = owed  # the user's debt (positive), which blocks spending until paid


class IdempotencyConflict(Exception):
    """The idempotency key was already used for a different request."""


@dataclass(frozen=True)
class Payout:
    """One finished request's charge: the consumer pays ``amount``; the provider gets its share,
    the platform the rest, less what the upstream costs (fallback requests)."""

    amount: int
    provider_user_id: int | None
    provider_share: int
    upstream_cost: int = 0
    request_id: str | None = None


@dataclass(frozen=True)
class Balances:
    available: int
    held: int
    earnings: int  # matured: can be paid out
    escrowed: int = 0
    payout_pending: int = 0
    owed: int = 0  # debt, as a positive amount


@dataclass(frozen=True)
class TopupResult:
    tx_id: str
    user_id: int
    amount: int
    created_at: datetime
    replayed: bool


def now() -> datetime:
    return datetime.now(UTC)


def provider_share(amount: int, fee_bps: int) -> int:
    """The provider's part of ``amount`` after the platform fee, rounded down (the platform keeps dust)."""
    return amount * (BASIS_POINTS - fee_bps) // BASIS_POINTS


# --- building blocks -----------------------------------------------------------------------------


async def post(
    conn: AsyncConnection, kind: str, ref: str | None, entries: list[tuple[str, int]], applied: tuple[str, ...] = ()
) -> str:
    """Write one balanced ledger transaction and apply it to balances (but ``applied``, already done)."""
    if sum(amount for _, amount in entries) != 0:
        raise ValueError(f"unbalanced {kind} transaction: {entries}")
    tx_id = "tx_" + secrets.token_hex(12)
    await conn.execute(insert(_transactions), [{"id": tx_id, "kind": kind, "ref": ref, "created_at": now()}])
    rows = [{"tx_id": tx_id, "account_id": account, "amount": amount} for account, amount in entries if amount]
    if rows:
        await conn.execute(insert(_entries), rows)
    deltas: dict[str, int] = {}
    for account, amount in entries:
        if account not in applied:
            deltas[account] = deltas.get(account, 0) + amount
    changes = [{"account": account, "delta": delta} for account, delta in sorted(deltas.items()) if delta]
    if changes:
        await conn.execute(
            update(_accounts)
            .where(_accounts.c.id == bindparam("account"))
            .values(balance=_accounts.c.balance + bindparam("delta")),
            changes,
        )
    return tx_id


async def balance_for_update(conn: AsyncConnection, account: str) -> int:
    """An account's balance, its row locked until the transaction ends. Lock accounts in id order,
    as postings take them. SQLite has no row locks and begins a transaction's write lock only at
    its first write, so a read before it could be stale by then: there an empty write to the row
    comes first, which takes the database's write lock for the rest of the transaction."""
    if conn.dialect.name == "sqlite":
        await conn.execute(update(_accounts).where(_accounts.c.id == account).values(balance=_accounts.c.balance))
    value = await conn.scalar(select(_accounts.c.balance).where(_accounts.c.id == account).with_for_update())
    return int(value or 0)


async def credit_wallet(
    conn: AsyncConnection, kind: str, ref: str | None, user_id: int, source: list[tuple[str, int]]
) -> str:
    """Post ``source`` (the debits paying for it) to the user: their debt first, the rest to the
    wallet. The debt row is locked first (``debt`` sorts before ``wallet``)."""
    amount = -sum(amount for _, amount in source)
    owed = -await balance_for_update(conn, debt(user_id))
    settled = min(max(amount, 0), owed)
    return await post(conn, kind, ref, [*source, (debt(user_id), settled), (wallet(user_id), amount - settled)])


async def _posted(conn: AsyncConnection, kind: str, ref: str) -> bool:
    """Whether a transaction of ``kind`` for ``ref`` is already in the ledger."""
    found = await conn.scalar(
        select(_transactions.c.id).where(_transactions.c.ref == ref, _transactions.c.kind == kind)
    )
    return found is not None


async def open_accounts(conn: AsyncConnection, user_id: int) -> None:
    """Create a new user's wallet, holds and earnings accounts."""
    at = now()
    await conn.execute(
        insert(_accounts),
        [
            {"id": f"{kind}:{user_id}", "kind": kind, "user_id": user_id, "balance": 0, "created_at": at}
            for kind in USER_ACCOUNT_KINDS
        ],
    )


async def balances(conn: AsyncConnection, user_id: int) -> Balances:
    rows = dict(
        (await conn.execute(select(_accounts.c.id, _accounts.c.balance).where(_accounts.c.user_id == user_id))).all()
    )
    return Balances(
        rows.get(wallet(user_id), 0),
        rows.get(held(user_id), 0),
        rows.get(earnings(user_id), 0),
        rows.get(escrow(user_id), 0),
        rows.get(payout_pending(user_id), 0),
        -rows.get(debt(user_id), 0),
    )


# --- credits in ----------------------------------------------------------------------------------


async def grant(conn: AsyncConnection, user_id: int, amount: int, ref: str | None = None) -> str:
    """Add ``amount`` to the user from the platform's funding account (their debt first)."""
    if amount <= 0:
        raise ValueError("a grant must be positive")
    return await credit_wallet(conn, "grant", ref, user_id, [(FUNDING, -amount)])


async def adjust(conn: AsyncConnection, user_id: int, amount: int, ref: str) -> str:
    """An operator's correction of a user's credit, either way: in, like a grant (the debt first);
    out, from the wallet only (:class:`InsufficientCredits` if it has less)."""
    if amount > 0:
        return await credit_wallet(conn, "adjust", ref, user_id, [(FUNDING, -amount)])
    if amount == 0:
        raise ValueError("an adjustment must change something")
    await balance_for_update(conn, debt(user_id))  # as every posting to this user's wallet: debt first
    taken = await conn.execute(
        update(_accounts)
        .where(_accounts.c.id == wallet(user_id), _accounts.c.balance >= -amount)
        .values(balance=_accounts.c.balance + amount)
    )
    if taken.rowcount != 1:
        available = await conn.scalar(select(_accounts.c.balance).where(_accounts.c.id == wallet(user_id)))
        raise InsufficientCredits(-amount, int(available or 0))
    return await post(conn, "adjust", ref, [(wallet(user_id), amount), (FUNDING, -amount)], applied=(wallet(user_id),))


def _topup_digest(user_id: int, amount: int) -> str:
    return hashlib.sha256(f"{user_id}:{amount}".encode()).hexdigest()


async def topup(engine: AsyncEngine, idempotency_key: str, user_id: int, amount: int) -> TopupResult:
    """Grant credits once per ``idempotency_key``: the same key and body give the same result, a
    different body raises :class:`IdempotencyConflict`."""
    digest = _topup_digest(user_id, amount)
    for _ in range(2):
        try:
            async with engine.begin() as conn:
                existing = (
                    await conn.execute(select(_topups).where(_topups.c.idempotency_key == idempotency_key))
                ).first()
                if existing is not None:
                    if existing.request_digest != digest:
                        raise IdempotencyConflict(idempotency_key)
                    return TopupResult(existing.tx_id, existing.user_id, existing.amount, existing.created_at, True)
                tx_id = await grant(conn, user_id, amount, ref=f"topup:{idempotency_key}"[:200])
                at = now()
                await conn.execute(
                    insert(_topups),
                    [
                        {
                            "idempotency_key": idempotency_key,
                            "request_digest": digest,
                            "user_id": user_id,
                            "amount": amount,
                            "tx_id": tx_id,
                            "created_at": at,
                        }
                    ],
                )
                return TopupResult(tx_id, user_id, amount, at, False)
        except IntegrityError:
            # A concurrent call with the same key won and this transaction (grant included) rolled
            # back; the next round reads the winner's result.
            continue
    raise IdempotencyConflict(idempotency_key)


# --- holds ---------------------------------------------------------------------------------------


async def hold(
    engine: AsyncEngine,
    hold_id: str,
    user_id: int,
    key_id: int | None,
    amount: int,
    owner: str,
    ttl: float,
) -> None:
    """Move ``amount`` from the user's wallet to their holds; :class:`InsufficientCredits` if short."""
    at = now()
    async with engine.begin() as conn:
        await _move_to_held(conn, hold_id, user_id, amount)
        await conn.execute(
            insert(_holds),
            [
                {
                    "id": hold_id,
                    "user_id": user_id,
                    "key_id": key_id,
                    "amount": amount,
                    "status": PENDING,
                    "owner": owner,
                    "created_at": at,
                    "expires_at": at + timedelta(seconds=ttl),
                    "charged": 0,
                }
            ],
        )


async def extend(engine: AsyncEngine, hold_id: str, user_id: int, amount: int) -> bool:
    """Add ``amount`` from the wallet to a pending hold (a credit lease that ran short);
    :class:`InsufficientCredits` if the wallet is short, ``False`` if the hold is no longer pending."""
    async with engine.begin() as conn:
        grown = await conn.execute(
            update(_holds)
            .where(_holds.c.id == hold_id, _holds.c.user_id == user_id, _holds.c.status == PENDING)
            .values(amount=_holds.c.amount + amount)
        )
        if grown.rowcount != 1:
            return False
        await _move_to_held(conn, hold_id, user_id, amount)
    return True


async def _move_to_held(conn: AsyncConnection, hold_id: str, user_id: int, amount: int) -> None:
    """The atomic conditional debit behind every hold: the wallet pays ``amount`` only if it has it."""
    # Account rows in id order (held < wallet), as every posting takes them.
    await conn.execute(
        update(_accounts).where(_accounts.c.id == held(user_id)).values(balance=_accounts.c.balance + amount)
    )
    spent = await conn.execute(
        update(_accounts)
        .where(_accounts.c.id == wallet(user_id), _accounts.c.balance >= amount)
        .values(balance=_accounts.c.balance - amount)
    )
    if spent.rowcount != 1:
        found = dict(
            (
                await conn.execute(
                    select(_accounts.c.id, _accounts.c.balance).where(
                        _accounts.c.id.in_([wallet(user_id), debt(user_id)])
                    )
                )
            ).all()
        )
        raise InsufficientCredits(amount, int(found.get(wallet(user_id), 0)), -int(found.get(debt(user_id), 0)))
    await post(
        conn,
        "hold",
        hold_id,
        [(wallet(user_id), -amount), (held(user_id), amount)],
        applied=(held(user_id), wallet(user_id)),
    )


async def charge(engine: AsyncEngine, hold_id: str, batch_id: str, payouts: list[Payout]) -> bool:
    """Charge several finished requests to one pending hold (a credit lease) in one transaction,
    leaving the hold pending; ``False`` (nothing written) if the hold is resolved or too small.
    Once per ``batch_id``: retrying a batch whose commit was in doubt does not charge it twice."""
    total = sum(p.amount for p in payouts)
    if total < 0 or any(p.amount < 0 or not 0 <= p.provider_share <= p.amount for p in payouts):
        raise ValueError("payouts must be non-negative and shares within their amounts")
    ref = f"{hold_id}/{batch_id}"
    async with engine.begin() as conn:
        if await _posted(conn, "charge", ref):
            return True
        row = (
            await conn.execute(
                update(_holds)
                .where(
                    _holds.c.id == hold_id,
                    _holds.c.status == PENDING,
                    _holds.c.charged + total <= _holds.c.amount,
                )
                .values(charged=_holds.c.charged + total)
                .returning(_holds.c.user_id)
            )
        ).first()
        if row is None:
            return False
        sums: dict[str, int] = {held(int(row[0])): -total}
        for p in payouts:
            credits = [
                (PLATFORM_FEES, p.amount - p.provider_share - p.upstream_cost),
                (UPSTREAM_COSTS, p.upstream_cost),
            ]
            if p.provider_user_id is not None:
                credits.append((escrow(p.provider_user_id), p.provider_share))
            for account, amount in credits:
                sums[account] = sums.get(account, 0) + amount
        await post(conn, "charge", ref, sorted(sums.items()))
    return True


async def renew_holds(engine: AsyncEngine, hold_ids: list[str], ttl: float) -> None:
    """Push back the expiry of pending holds still in use (long-lived credit leases), so that no
    sweep takes them for abandoned."""
    async with engine.begin() as conn:
        await conn.execute(
            update(_holds)
            .where(_holds.c.id.in_(hold_ids), _holds.c.status == PENDING)
            .values(expires_at=now() + timedelta(seconds=ttl))
        )


async def release(engine: AsyncEngine, hold_id: str, reason: str) -> bool:
    """Return what a pending hold has not charged to the wallet and close it; ``False`` if it was
    already resolved."""
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                update(_holds)
                .where(_holds.c.id == hold_id, _holds.c.status == PENDING)
                .values(status=RELEASED, resolved_at=now(), reason=reason)
                .returning(_holds.c.amount, _holds.c.user_id, _holds.c.charged)
            )
        ).first()
        if row is None:
            return False
        rest, user_id = int(row[0]) - int(row[2]), int(row[1])
        await credit_wallet(conn, "release", hold_id, user_id, [(held(user_id), -rest)])
    return True


async def refund(
    engine: AsyncEngine, request_id: str, user_id: int, provider_user_id: int, amount: int, share: int
) -> bool:
    """Give a consumer back what one request cost (their debt first, if any): the provider's
    ``share`` out of its escrowed earnings, then its matured ones, as far as they go, the rest out
    of the platform's fees; the request log marks the request refunded in the same transaction.
    Once per request (a unique index makes sure): ``False`` if it was already refunded."""
    if not 0 <= share <= amount:
        raise ValueError("a refund's provider share must be within its amount")
    async with engine.begin() as conn:
        if await _posted(conn, "refund", request_id):
            return False
        # Locked in id order (debt < earnings < escrow): what is read stays until the entry lands.
        owed = -await balance_for_update(conn, debt(user_id))
        matured = await balance_for_update(conn, earnings(provider_user_id))
        escrowed = await balance_for_update(conn, escrow(provider_user_id))
        from_escrow = min(share, escrowed)
        from_earnings = min(share - from_escrow, matured)
        taken = from_escrow + from_earnings
        settled = min(amount, owed)
        await post(
            conn,
            "refund",
            request_id,
            [
                (debt(user_id), settled),
                (wallet(user_id), amount - settled),
                (escrow(provider_user_id), -from_escrow),
                (earnings(provider_user_id), -from_earnings),
                (PLATFORM_FEES, taken - amount),
            ],
        )
        await conn.execute(update(_request_log).where(_request_log.c.id == request_id).values(refunded=True))
    return True


# --- coordinator instances and orphaned holds ---------------------------------------------------


async def renew_instance(engine: AsyncEngine, instance_id: str, started_at: datetime) -> None:
    """Record that this coordinator is alive (its pending holds belong to live requests), and forget
    instances gone for a week (any hold they left is released as orphaned either way)."""
    at = now()
    async with engine.begin() as conn:
        await conn.execute(delete(_instances).where(_instances.c.seen_at < at - timedelta(days=7)))
        renewed = await conn.execute(update(_instances).where(_instances.c.id == instance_id).values(seen_at=at))
        if renewed.rowcount == 0:
            await conn.execute(insert(_instances), [{"id": instance_id, "started_at": started_at, "seen_at": at}])


async def orphaned_holds(engine: AsyncEngine, instance_id: str, live: set[str], lease: float) -> list[str]:
    """Pending holds whose request is gone: expired, owned by a coordinator that stopped renewing
    its lease (crashed or restarted), or owned by this one but no longer tracked in ``live``."""
    at = now()
    alive = select(_instances.c.id).where(_instances.c.seen_at >= at - timedelta(seconds=lease))
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(_holds.c.id, _holds.c.owner).where(
                    _holds.c.status == PENDING,
                    or_(
                        _holds.c.expires_at < at,
                        _holds.c.owner.not_in(alive),
                        and_(_holds.c.owner == instance_id, _holds.c.created_at < at - timedelta(seconds=2)),
                    ),
                )
            )
        ).all()
    return [hold_id for hold_id, owner in rows if owner != instance_id or hold_id not in live]
