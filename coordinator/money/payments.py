"""Money paid in through the payment provider: one ``payments`` row per top-up, and what its events
did to the ledger.

The provider's events say what is known of a payment — paid, refunded so far, disputed — and may come
twice, late or out of order. So an event only ever raises those facts (a refund total never falls, a
dispute never goes back from closed to open) and the ledger then posts the difference between what
the payment is worth now (paid, less refunds and what a dispute holds) and what it has credited: a
credit pays the user's debt first, then the wallet; a reversal takes from the wallet as far as it
goes and records the rest as debt (``ledger.debt``), which blocks spending until it is paid. Each
event id is recorded in the same transaction as its effect, so a replay changes nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from coordinator.core.models import Account, AutoTopup, Payment, WebhookEvent
from coordinator.money import ledger
from coordinator.money.ledger import FUNDING, balance_for_update, debt, now, post, wallet

_accounts = cast(Table, Account.__table__)
_autos = cast(Table, AutoTopup.__table__)
_payments = cast(Table, Payment.__table__)
_events = cast(Table, WebhookEvent.__table__)

OPEN, PAID, EXPIRED, FAILED = "open", "paid", "expired", "failed"
DISPUTE_OPEN, DISPUTE_CLOSED = 1, 2


@dataclass(frozen=True)
class Facts:
    """What one event says of a payment; ``None`` where it says nothing."""

    paid: int | None = None  # nano-USD received
    payment_intent: str | None = None
    refunded: int | None = None  # cumulative
    dispute_stage: int | None = None
    disputed: int | None = None  # what the dispute holds at that stage (0 once won)
    status: str | None = None  # expired, failed


@dataclass(frozen=True)
class Applied:
    payment_id: str
    user_id: int
    change: int  # what the ledger moved for this event: + credit, - reversal
    credited: int  # what the payment is worth to the wallet now


def new_id() -> str:
    return "pay_" + secrets.token_hex(12)


def crossing_id(user_id: int, fired: int) -> str:
    """The payment of an automatic top-up's crossing: the same id however often it is tried."""
    return "pay_" + hashlib.sha256(f"auto:{user_id}:{fired}".encode()).hexdigest()[:24]


async def open_payment(engine: AsyncEngine, payment_id: str, user_id: int, amount: int, kind: str) -> None:
    """A new payment, open (an id already there is left as it is: a retried automatic top-up)."""
    at = now()
    async with engine.begin() as conn:
        if await conn.scalar(select(_payments.c.id).where(_payments.c.id == payment_id)) is not None:
            return
        await conn.execute(
            insert(_payments),
            [
                {
                    "id": payment_id,
                    "user_id": user_id,
                    "kind": kind,
                    "status": OPEN,
                    "amount": amount,
                    "paid": 0,
                    "refunded": 0,
                    "disputed": 0,
                    "dispute_stage": 0,
                    "credited": 0,
                    "created_at": at,
                    "updated_at": at,
                }
            ],
        )


async def attach_session(engine: AsyncEngine, payment_id: str, session_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(_payments).where(_payments.c.id == payment_id).values(session_id=session_id))


async def find(engine: AsyncEngine, *, session_id: str | None = None, payment_intent: str | None = None) -> str | None:
    """A payment's id by its Checkout session or payment intent."""
    column, value = (
        (_payments.c.session_id, session_id) if session_id is not None else (_payments.c.payment_intent, payment_intent)
    )
    if value is None:
        return None
    async with engine.connect() as conn:
        found = await conn.scalar(select(_payments.c.id).where(column == value))
    return None if found is None else str(found)


async def seen(engine: AsyncEngine, event_id: str) -> bool:
    async with engine.connect() as conn:
        return await conn.scalar(select(_events.c.id).where(_events.c.id == event_id)) is not None


async def record_event(engine: AsyncEngine, event_id: str, event_type: str) -> bool:
    """Record an event that changes nothing here; ``False`` if it was recorded before."""
    try:
        async with engine.begin() as conn:
            await _record(conn, event_id, event_type)
    except IntegrityError:
        return False
    return True


async def _record(conn: AsyncConnection, event_id: str, event_type: str) -> None:
    await conn.execute(insert(_events), [{"id": event_id, "type": event_type[:100], "received_at": now()}])


def worth(paid: int, refunded: int, disputed: int) -> int:
    """What a payment is worth to the wallet: what came in, less what went back or is disputed."""
    return max(0, paid - refunded - disputed)


async def apply(engine: AsyncEngine, event_id: str, event_type: str, payment_id: str, facts: Facts) -> Applied | None:
    """Apply one event's facts to a payment and post the difference; ``None`` if the event was
    applied before (or the payment is unknown: nothing to do)."""
    try:
        async with engine.begin() as conn:
            await _record(conn, event_id, event_type)
            row = (await conn.execute(select(_payments).where(_payments.c.id == payment_id).with_for_update())).first()
            if row is None:
                return None
            paid = max(row.paid, facts.paid or 0)
            refunded = max(row.refunded, facts.refunded or 0)
            stage, disputed = row.dispute_stage, row.disputed
            if facts.dispute_stage is not None and facts.dispute_stage > stage:
                stage, disputed = facts.dispute_stage, facts.disputed or 0
            status = PAID if paid > 0 else (facts.status or row.status)
            target = worth(paid, refunded, disputed)
            change = target - row.credited
            if change > 0:
                await ledger.credit_wallet(conn, "payment", payment_id, row.user_id, [(FUNDING, -change)])
            elif change < 0:
                await _reverse(conn, payment_id, row.user_id, -change)
            await conn.execute(
                update(_payments)
                .where(_payments.c.id == payment_id)
                .values(
                    paid=paid,
                    refunded=refunded,
                    dispute_stage=stage,
                    disputed=disputed,
                    status=status,
                    credited=target,
                    payment_intent=row.payment_intent or facts.payment_intent,
                    updated_at=now(),
                )
            )
            return Applied(payment_id, int(row.user_id), change, target)
    except IntegrityError:
        # The event was recorded by an earlier (or a concurrent) delivery; its effect is in.
        if await seen(engine, event_id):
            return None
        raise


async def _reverse(conn: AsyncConnection, payment_id: str, user_id: int, amount: int) -> None:
    """Take ``amount`` back to the platform: from the wallet as far as it goes, the rest as debt."""
    await balance_for_update(conn, debt(user_id))  # id order: debt, then wallet
    available = await balance_for_update(conn, wallet(user_id))
    taken = min(amount, available)
    await post(
        conn, "reversal", payment_id, [(FUNDING, amount), (debt(user_id), taken - amount), (wallet(user_id), -taken)]
    )


# --- automatic top-ups ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Auto:
    """A user's automatic top-up, as stored."""

    user_id: int
    customer_id: str
    payment_method: str
    threshold: int
    amount: int
    enabled: bool
    armed: bool
    fired: int
    last_error: str | None


def _auto(row: Any) -> Auto:
    return Auto(**{name: getattr(row, name) for name in Auto.__dataclass_fields__})


async def auto_of(engine: AsyncEngine, user_id: int) -> Auto | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(_autos).where(_autos.c.user_id == user_id))).first()
    return None if row is None else _auto(row)


async def save_method(engine: AsyncEngine, user_id: int, customer_id: str, payment_method: str) -> None:
    """Keep the payment method a Checkout saved, for automatic top-ups (off until the user turns
    them on; a newer card replaces the older)."""
    async with engine.begin() as conn:
        saved = await conn.execute(
            update(_autos)
            .where(_autos.c.user_id == user_id)
            .values(
                customer_id=customer_id, payment_method=payment_method, last_error=None, armed=True, updated_at=now()
            )
        )
        if saved.rowcount == 0:
            row = {
                "user_id": user_id,
                "customer_id": customer_id,
                "payment_method": payment_method,
                "threshold": 0,
                "amount": 0,
                "enabled": False,
                "armed": True,
                "fired": 0,
                "updated_at": now(),
            }
            await conn.execute(insert(_autos), [row])


async def set_auto(engine: AsyncEngine, user_id: int, enabled: bool, threshold: int, amount: int) -> bool:
    """Turn automatic top-ups on or off at a threshold and amount; ``False`` without a saved method."""
    async with engine.begin() as conn:
        changed = await conn.execute(
            update(_autos)
            .where(_autos.c.user_id == user_id)
            .values(enabled=enabled, threshold=threshold, amount=amount, last_error=None, armed=True, updated_at=now())
        )
    return changed.rowcount == 1


def _balance(user_id_column: Any) -> Any:
    """A user's balance as the portal shows it (wallet, held credit, less debt), as a subquery."""
    return (
        select(func.coalesce(func.sum(_accounts.c.balance), 0))
        .where(_accounts.c.user_id == user_id_column, _accounts.c.kind.in_(["wallet", "held", "debt"]))
        .scalar_subquery()
    )


async def rearm(engine: AsyncEngine) -> int:
    """Arm again the automatic top-ups whose balance is back at or over their threshold."""
    async with engine.begin() as conn:
        done = await conn.execute(
            update(_autos)
            .where(
                _autos.c.enabled.is_(True), _autos.c.armed.is_(False), _balance(_autos.c.user_id) >= _autos.c.threshold
            )
            .values(armed=True)
        )
    return int(done.rowcount or 0)


async def due(engine: AsyncEngine) -> list[Auto]:
    """Armed automatic top-ups whose balance is under their threshold."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(_autos).where(
                    _autos.c.enabled.is_(True),
                    _autos.c.armed.is_(True),
                    _balance(_autos.c.user_id) < _autos.c.threshold,
                )
            )
        ).all()
    return [_auto(row) for row in rows]


async def stalled(engine: AsyncEngine, older_than: datetime, newer_than: datetime) -> list[Auto]:
    """Automatic top-ups whose last crossing was taken but whose charge never came back (the
    process stopped between the two, or the answer was lost): their payment is missing, or still
    open, since ``older_than``. Not those older than ``newer_than``: the provider keeps an
    idempotency key a day, and a retry after that could charge twice."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(_autos).where(
                    _autos.c.enabled.is_(True),
                    _autos.c.armed.is_(False),
                    _autos.c.fired > 0,
                    _autos.c.updated_at < older_than,
                    _autos.c.updated_at > newer_than,
                )
            )
        ).all()
        found = []
        for row in rows:
            status = await conn.scalar(
                select(_payments.c.status).where(_payments.c.id == crossing_id(row.user_id, row.fired - 1))
            )
            if status in (None, OPEN):
                found.append(_auto(row))
    return found


async def disarm(engine: AsyncEngine, user_id: int, fired: int) -> bool:
    """Take the right to fire this crossing's charge: ``True`` for exactly one caller, whatever the
    processes (a conditional update of ``armed`` and the count it was read at)."""
    async with engine.begin() as conn:
        taken = await conn.execute(
            update(_autos)
            .where(_autos.c.user_id == user_id, _autos.c.armed.is_(True), _autos.c.fired == fired)
            .values(armed=False, fired=fired + 1, updated_at=now())
        )
    return taken.rowcount == 1


async def owner_of(engine: AsyncEngine, payment_id: str) -> int | None:
    async with engine.connect() as conn:
        found = await conn.scalar(select(_payments.c.user_id).where(_payments.c.id == payment_id))
    return None if found is None else int(found)


async def auto_failed(engine: AsyncEngine, user_id: int, reason: str) -> None:
    """A charge was declined: automatic top-ups stop until the user saves a card or turns them on again."""
    async with engine.begin() as conn:
        await conn.execute(
            update(_autos)
            .where(_autos.c.user_id == user_id)
            .values(enabled=False, last_error=reason[:500], updated_at=now())
        )
