"""Money paid out to providers, and the escrow before it.

A charge puts the provider's share in escrow (``ledger.escrow``); :func:`mature` moves what has
been there for the hold period into its earnings (``ledger.earnings``), the only money a payout may
take, so a failed canary can still claw back what is young. A payout then goes

    requested  earnings → payout pending      (the provider asks, at least the minimum)
    approved   no money moves                  (an operator says yes)
    paid       payout pending → paid out       (the transfer was made)
    rejected / failed   back to earnings       (an operator said no; the transfer failed or was reversed)

Each step is a conditional update of the payout's status and one balanced ledger transaction in the
same database transaction, so no step happens twice, whichever processes try it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, and_, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core.models import Account, LedgerEntry, LedgerTransaction, PayoutAccount, PayoutRow, WebhookEvent
from coordinator.money.ledger import PAID_OUT, balance_for_update, debt, earnings, escrow, now, payout_pending, post

_accounts = cast(Table, Account.__table__)
_entries = cast(Table, LedgerEntry.__table__)
_transactions = cast(Table, LedgerTransaction.__table__)
_payouts = cast(Table, PayoutRow.__table__)
_payout_accounts = cast(Table, PayoutAccount.__table__)
_events = cast(Table, WebhookEvent.__table__)

REQUESTED, APPROVED, PAID, REJECTED, FAILED = "requested", "approved", "paid", "rejected", "failed"


class PayoutRefused(Exception):
    """A payout that cannot be requested or moved on; ``code`` says why (for the API's error)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Payout:
    id: str
    user_id: int
    amount: int
    status: str
    destination: str
    transfer_id: str | None
    failure: str | None
    decided_by: str | None
    requested_at: datetime
    decided_at: datetime | None
    finished_at: datetime | None


def _payout(row: object) -> Payout:
    return Payout(**{name: getattr(row, name) for name in Payout.__dataclass_fields__})


def new_id() -> str:
    return "po_" + secrets.token_hex(12)


# --- escrow --------------------------------------------------------------------------------------


async def mature(engine: AsyncEngine, cutoff: datetime) -> int:
    """Move every provider's escrowed earnings credited before ``cutoff`` into its earnings; the
    total moved. What left escrow since (refunds, earlier maturing) counts against the oldest
    credits first, so a run is idempotent and two runs at once cannot move a nano twice."""
    async with engine.connect() as conn:
        owners = (
            await conn.execute(select(_accounts.c.user_id).where(_accounts.c.kind == "escrow", _accounts.c.balance > 0))
        ).all()
    total = 0
    for (user_id,) in owners:
        async with engine.begin() as conn:
            await balance_for_update(conn, earnings(user_id))  # id order, as refunds take them
            held = await balance_for_update(conn, escrow(user_id))
            old = case((_transactions.c.created_at < cutoff, _entries.c.amount), else_=0)
            row = (
                await conn.execute(
                    select(
                        func.coalesce(func.sum(case((_entries.c.amount > 0, old), else_=0)), 0),
                        func.coalesce(func.sum(case((_entries.c.amount < 0, -_entries.c.amount), else_=0)), 0),
                    )
                    .select_from(_entries.join(_transactions, _transactions.c.id == _entries.c.tx_id))
                    .where(_entries.c.account_id == escrow(user_id))
                )
            ).one()
            due = min(held, int(row[0]) - int(row[1]))
            if due > 0:
                await post(conn, "mature", None, [(earnings(user_id), due), (escrow(user_id), -due)])
                total += due
    return total


# --- payout accounts -----------------------------------------------------------------------------


async def account_of(engine: AsyncEngine, user_id: int) -> str | None:
    async with engine.connect() as conn:
        found = await conn.scalar(select(_payout_accounts.c.account_id).where(_payout_accounts.c.user_id == user_id))
    return None if found is None else str(found)


async def connect_account(engine: AsyncEngine, user_id: int, account_id: str) -> str:
    """Remember the user's payout account; if one is already remembered, that one (a second
    click on "connect" during onboarding must not leave two)."""
    async with engine.begin() as conn:
        found = await conn.scalar(select(_payout_accounts.c.account_id).where(_payout_accounts.c.user_id == user_id))
        if found is not None:
            return str(found)
        await conn.execute(
            insert(_payout_accounts), [{"user_id": user_id, "account_id": account_id, "created_at": now()}]
        )
    return account_id


# --- payouts -------------------------------------------------------------------------------------


async def request(engine: AsyncEngine, payout_id: str, user_id: int, amount: int, minimum: int) -> Payout:
    """Move ``amount`` of the provider's earnings to a pending payout; :class:`PayoutRefused` if it
    is under the minimum, more than its earnings, or it has no payout account."""
    if amount < minimum:
        raise PayoutRefused("payout_below_minimum", f"A payout must be at least the minimum ({minimum} nano-USD).")
    destination = await account_of(engine, user_id)
    if destination is None:
        raise PayoutRefused("payout_account_missing", "Connect a payout account first.")
    at = now()
    async with engine.begin() as conn:
        owed = -await balance_for_update(conn, debt(user_id))
        if owed > 0:  # a chargeback left a debt: no cash-out before it is paid
            raise PayoutRefused("debt_outstanding", f"Your account owes {owed} nano-USD; pay it before a payout.")
        available = await balance_for_update(conn, earnings(user_id))
        if amount > available:
            raise PayoutRefused(
                "insufficient_earnings", f"Only matured earnings can be paid out; {available} nano-USD are."
            )
        await post(conn, "payout_request", payout_id, [(earnings(user_id), -amount), (payout_pending(user_id), amount)])
        row = {
            "id": payout_id,
            "user_id": user_id,
            "amount": amount,
            "status": REQUESTED,
            "destination": destination,
            "requested_at": at,
        }
        await conn.execute(insert(_payouts), [row])
    found = await get(engine, payout_id)
    assert found is not None
    return found


async def get(engine: AsyncEngine, payout_id: str) -> Payout | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(_payouts).where(_payouts.c.id == payout_id))).first()
    return None if row is None else _payout(row)


async def listed(
    engine: AsyncEngine, user_id: int | None = None, status: str | None = None, limit: int = 100
) -> list[Payout]:
    """Payouts, newest first: one user's, or everyone's (the operator's), of one status or all."""
    query = select(_payouts).order_by(_payouts.c.requested_at.desc(), _payouts.c.id.desc()).limit(limit)
    if user_id is not None:
        query = query.where(_payouts.c.user_id == user_id)
    if status is not None:
        query = query.where(_payouts.c.status == status)
    async with engine.connect() as conn:
        return [_payout(row) for row in (await conn.execute(query)).all()]


def _money(before: str, after: str, user_id: int, amount: int) -> list[tuple[str, int]]:
    """The ledger entries of one step (none for an approval)."""
    if after == PAID:
        return [(PAID_OUT, amount), (payout_pending(user_id), -amount)]
    if before == PAID:  # a transfer reversed after it was made
        return [(PAID_OUT, -amount), (earnings(user_id), amount)]
    if after in (REJECTED, FAILED):
        return [(earnings(user_id), amount), (payout_pending(user_id), -amount)]
    return []


async def _move(
    engine: AsyncEngine, payout_id: str, before: str, after: str, event: tuple[str, str] | None = None, **values: object
) -> Payout:
    """Move a payout from ``before`` to ``after`` with its money, in one transaction (with the
    payment provider's ``event`` recorded, if one caused it); :class:`PayoutRefused` if it is not
    ``before`` (another step came first) or the event was applied before."""
    async with engine.begin() as conn:
        if event is not None:
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(_events), [{"id": event[0], "type": event[1][:100], "received_at": now()}]
                    )
            except IntegrityError:
                raise PayoutRefused("already_applied", "This event was applied before.") from None
        row = (
            await conn.execute(
                update(_payouts)
                .where(and_(_payouts.c.id == payout_id, _payouts.c.status == before))
                .values(status=after, **values)
                .returning(_payouts.c.user_id, _payouts.c.amount)
            )
        ).first()
        if row is None:
            current = await conn.scalar(select(_payouts.c.status).where(_payouts.c.id == payout_id))
            if current is None:
                raise PayoutRefused("not_found", "No such payout.")
            raise PayoutRefused("payout_state", f"The payout is {current}, not {before}.")
        entries = _money(before, after, int(row[0]), int(row[1]))
        if entries:
            await post(conn, "payout_" + after if after != FAILED else "payout_return", payout_id, entries)
    found = await get(engine, payout_id)
    assert found is not None
    return found


async def approve(engine: AsyncEngine, payout_id: str, operator: str) -> Payout:
    return await _move(engine, payout_id, REQUESTED, APPROVED, decided_by=operator[:320], decided_at=now())


async def reject(engine: AsyncEngine, payout_id: str, operator: str, reason: str) -> Payout:
    return await _move(
        engine, payout_id, REQUESTED, REJECTED, decided_by=operator[:320], decided_at=now(), failure=reason[:500]
    )


async def transferred(engine: AsyncEngine, payout_id: str, transfer_id: str) -> Payout:
    return await _move(engine, payout_id, APPROVED, PAID, transfer_id=transfer_id[:255], finished_at=now())


async def failed(
    engine: AsyncEngine, payout_id: str, reason: str, was: str = APPROVED, event: tuple[str, str] | None = None
) -> Payout:
    """The transfer failed (``was`` approved) or was reversed after it was made (``was`` paid, by
    the provider's ``event``): the amount goes back to the provider's earnings."""
    return await _move(engine, payout_id, was, FAILED, event, failure=reason[:500], finished_at=now())


async def approved_before(engine: AsyncEngine, cutoff: datetime) -> list[str]:
    """Approved payouts whose transfer has not been made since ``cutoff`` (the process that
    approved them stopped): the sweep tries them again, with the same idempotency key."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(_payouts.c.id).where(_payouts.c.status == APPROVED, _payouts.c.decided_at < cutoff)
            )
        ).all()
    return [str(row[0]) for row in rows]
