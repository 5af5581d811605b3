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

import secrets
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from coordinator.core.models import Payment, WebhookEvent
from coordinator.money import ledger
from coordinator.money.ledger import FUNDING, balance_for_update, debt, now, post, wallet

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


async def open_payment(engine: AsyncEngine, payment_id: str, user_id: int, amount: int, kind: str) -> None:
    at = now()
    async with engine.begin() as conn:
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
