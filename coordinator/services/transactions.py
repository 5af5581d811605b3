"""A user's credit statement, read from the ledger: what changed their balance (wallet, held credit
and debt together), newest first, one line per top-up, refund, reversal or adjustment and one per
day of spend; and a month of it as CSV with its opening and closing balance.

Holds and releases only move credit between the wallet and held credit, so they are not lines. A
day's spend is the sum of the charges written that day (UTC); today's grows as requests end.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import msgspec
from sqlalchemy import ColumnElement, Table, and_, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.core.models import LedgerEntry, LedgerTransaction
from coordinator.money import ledger
from coordinator.services.state import PoolState
from coordinator.services.statements import cursor_for, cursor_position
from shared.money import nano_to_usd

_entries = cast(Table, LedgerEntry.__table__)
_tx = cast(Table, LedgerTransaction.__table__)

KINDS = {"payment": "topup", "grant": "adjustment", "adjust": "adjustment", "refund": "refund", "reversal": "reversal"}
DESCRIBED = {
    "topup": "Credits added (payment {ref})",
    "adjustment": "Adjusted by the operator{reason}",
    "refund": "Refund of request {ref} (a failed verification)",
    "reversal": "Payment {ref} refunded or disputed",
    "spend": "Requests on {day}",
}
SPEND = "spend:"


class Transaction(msgspec.Struct):
    id: str  # the ledger transaction, or spend:YYYY-MM-DD
    kind: str  # topup | refund | reversal | adjustment | spend
    at: datetime  # when it was written (a day's spend: its latest charge)
    amountUsd: float  # what it did to the balance: + in, - out
    amountNano: int
    description: str


class Transactions(msgspec.Struct):
    data: list[Transaction]
    nextCursor: str | None


def _day(column: Any, dialect: str) -> ColumnElement[str]:
    """A timestamp's UTC day as YYYY-MM-DD, on either database."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)


def _describe(kind: str, ref: str | None, day: str = "") -> str:
    reason = f": {ref.partition(': ')[2]}" if kind == "adjustment" and ref and ref.startswith("by ") else ""
    return DESCRIBED[kind].format(ref=ref or "", day=day, reason=reason)


async def _lines(
    conn: AsyncConnection,
    user_id: int,
    before: tuple[datetime, str] | None,
    since: datetime | None,
    limit: int | None,
) -> list[Transaction]:
    """Lines older than ``before`` (a position) and not older than ``since``, newest first."""
    balance_accounts = [ledger.wallet(user_id), ledger.held(user_id), ledger.debt(user_id)]
    dialect = conn.dialect.name
    single = (
        select(_tx.c.id, _tx.c.kind, _tx.c.ref, _tx.c.created_at, func.sum(_entries.c.amount))
        .select_from(_entries.join(_tx, _tx.c.id == _entries.c.tx_id))
        .where(_entries.c.account_id.in_(balance_accounts), _tx.c.kind.in_(list(KINDS)))
        .group_by(_tx.c.id, _tx.c.kind, _tx.c.ref, _tx.c.created_at)
        .order_by(_tx.c.created_at.desc(), _tx.c.id.desc())
    )
    day = _day(_tx.c.created_at, dialect).label("day")
    spend = (
        select(day, func.max(_tx.c.created_at).label("last"), func.sum(_entries.c.amount))
        .select_from(_entries.join(_tx, _tx.c.id == _entries.c.tx_id))
        .where(_entries.c.account_id == ledger.held(user_id), _tx.c.kind == "charge")
        .group_by(day)
        .order_by(func.max(_tx.c.created_at).desc())
    )
    if since is not None:
        single = single.where(_tx.c.created_at >= since)
        spend = spend.where(_tx.c.created_at >= since)
    if before is not None:
        at, position = before
        stamp = literal(at, type_=_tx.c.created_at.type)
        single = single.where(or_(_tx.c.created_at < stamp, and_(_tx.c.created_at == stamp, _tx.c.id < position)))
        spend = spend.having(func.max(_tx.c.created_at) <= stamp)  # (a user has a line a day: few)
    if limit is not None:
        single = single.limit(limit)
    found = [
        Transaction(tx_id, KINDS[kind], _utc(at), nano_to_usd(int(total)), int(total), _describe(KINDS[kind], ref))
        for tx_id, kind, ref, at, total in (await conn.execute(single)).all()
    ]
    found += [
        Transaction(SPEND + str(d), "spend", _utc(at), nano_to_usd(int(total)), int(total), _describe("spend", None, d))
        for d, at, total in (await conn.execute(spend)).all()
        if total
    ]
    if before is not None:
        found = [line for line in found if (line.at, line.id) < (_utc(before[0]), before[1])]
    found.sort(key=lambda t: (t.at, t.id), reverse=True)
    return found[:limit] if limit is not None else found


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def transactions(pool: PoolState, user_id: int, cursor: str | None, limit: int) -> Transactions:
    """A page of the user's statement lines, newest first; ``ValueError`` for a cursor not ours."""
    before = cursor_position(cursor) if cursor is not None else None
    await pool.leases.flush(user_id=user_id)  # this process's charges not yet written
    async with pool.engine.connect() as conn:
        lines = await _lines(conn, user_id, before, None, limit + 1)
    more = len(lines) > limit
    page = lines[:limit]
    return Transactions(page, cursor_for(page[-1].at, page[-1].id) if more and page else None)


@dataclass(frozen=True)
class Statement:
    month: str
    opening: int
    closing: int
    lines: list[Transaction]  # oldest first


def month_range(month: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` as [first instant, first instant of the next month); ``ValueError`` if not one."""
    first = date.fromisoformat(f"{month}-01")
    if len(month) != 7:
        raise ValueError("not YYYY-MM")
    following = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
    return datetime(first.year, first.month, 1, tzinfo=UTC), datetime(following.year, following.month, 1, tzinfo=UTC)


async def statement(pool: PoolState, user_id: int, month: str) -> Statement:
    """A month of the user's statement (``ValueError`` for a bad month): balance at its start, its
    lines, balance at its end."""
    start, end = month_range(month)
    await pool.leases.flush(user_id=user_id)
    accounts = [ledger.wallet(user_id), ledger.held(user_id), ledger.debt(user_id)]
    async with pool.engine.connect() as conn:
        opening = await conn.scalar(
            select(func.coalesce(func.sum(_entries.c.amount), 0))
            .select_from(_entries.join(_tx, _tx.c.id == _entries.c.tx_id))
            .where(_entries.c.account_id.in_(accounts), _tx.c.created_at < start)
        )
        lines = await _lines(conn, user_id, (end, ""), start, None)
    lines.reverse()
    opening = int(opening or 0)
    return Statement(month, opening, opening + sum(line.amountNano for line in lines), lines)


def statement_csv(found: Statement) -> str:
    """The statement as CSV: opening balance, one row per line, closing balance (USD and nano-USD)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["date", "kind", "description", "amount_usd", "amount_nano", "balance_usd", "id"])
    start = month_range(found.month)[0].date().isoformat()
    writer.writerow([start, "opening", "Balance at the start of the month", "", "", _usd(found.opening), ""])
    balance = found.opening
    for line in found.lines:
        balance += line.amountNano
        when = line.id.removeprefix(SPEND) if line.kind == "spend" else line.at.isoformat()
        writer.writerow(
            [when, line.kind, line.description, _usd(line.amountNano), line.amountNano, _usd(balance), line.id]
        )
    writer.writerow(["", "closing", "Balance at the end of the month", "", "", _usd(found.closing), ""])
    return out.getvalue()


def _usd(nano: int) -> str:
    """Exact USD: nano-USD as a decimal number."""
    text = f"{Decimal(nano).scaleb(-9):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
