"""A user's money, read-only: credits, usage and earnings per day and model, one generation.
The account API and the portal pages both read these."""

from __future__ import annotations

import base64
import csv
import io
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import msgspec
from sqlalchemy import Table, and_, case, func, or_, select

from coordinator.core.errors import PoolError
from coordinator.core.models import RequestLogRow
from coordinator.money import ledger, payouts
from coordinator.money.requestlog import RequestRecord
from coordinator.services.state import PoolState
from shared import errors
from shared.money import nano_to_usd

log = logging.getLogger(__name__)


_log = cast(Table, RequestLogRow.__table__)


class Credits(msgspec.Struct):
    balanceUsd: float
    heldUsd: float
    availableUsd: float
    balanceNano: int
    heldNano: int
    availableNano: int
    owedUsd: float = 0.0  # debt from a payment refunded or disputed after it was spent: blocks requests
    owedNano: int = 0


class UsageRow(msgspec.Struct):
    date: str
    model: str
    requests: int
    failedRequests: int
    promptTokens: int
    completionTokens: int
    costUsd: float
    costNano: int
    kind: str = "chat"  # the API: chat, completion, embedding, responses, messages


class KindTotal(msgspec.Struct):
    """One API's share of the period: requests, tokens and spend."""

    kind: str
    requests: int
    promptTokens: int
    completionTokens: int
    costUsd: float
    costNano: int


class Usage(msgspec.Struct):
    fromDate: str
    toDate: str
    data: list[UsageRow]  # per day, model and kind
    byKind: list[KindTotal] = []  # the period's totals per kind, the most spent first


class Generation(msgspec.Struct):
    id: str
    model: str
    createdAt: datetime
    status: int
    errorCode: str | None
    stream: bool
    fallback: bool
    provider: int | str | None
    agentId: str | None
    latencyMs: int
    ttftMs: int | None
    promptTokens: int
    completionTokens: int
    reportedPromptTokens: int | None
    reportedCompletionTokens: int | None
    usageCapped: bool
    costUsd: float
    costNano: int
    refunded: bool  # a failed verification of the agent gave the cost back
    keyId: int | None = None
    project: str | None = None  # the key's policy's project
    user: str | None = None  # the request's ``user`` field
    metadata: dict[str, str] | None = None  # the request's ``metadata`` tags
    dlp: dict[str, int] | None = None  # what data protection found in the prompt, per detector
    kind: str = "chat"  # the API it came through: chat, completion, embedding, responses, messages


class EarningsRow(msgspec.Struct):
    date: str
    model: str
    requests: int
    promptTokens: int
    completionTokens: int
    earnedUsd: float
    earnedNano: int


class Earnings(msgspec.Struct):
    balanceUsd: float  # escrowed and matured: everything earned and not yet paid out
    balanceNano: int
    fromDate: str
    toDate: str
    data: list[EarningsRow]
    escrowedUsd: float = 0.0  # still in escrow: a failed canary can claw it back
    escrowedNano: int = 0
    availableUsd: float = 0.0  # matured: can be paid out
    availableNano: int = 0


class PayoutOut(msgspec.Struct):
    id: str
    userId: int
    amountUsd: float
    amountNano: int
    status: str
    transferId: str | None
    failure: str | None
    requestedAt: datetime
    decidedAt: datetime | None
    finishedAt: datetime | None


class PayoutFigures(msgspec.Struct):
    escrowedUsd: float  # earned, still in escrow (POOL_PAYOUT_HOLD_DAYS)
    availableUsd: float  # matured: can be paid out
    pendingUsd: float  # requested or approved, not yet paid
    minimumUsd: float
    holdDays: float
    accountConnected: bool
    escrowedNano: int
    availableNano: int
    pendingNano: int
    data: list[PayoutOut]


def payout_out(p: payouts.Payout) -> PayoutOut:
    return PayoutOut(
        p.id,
        p.user_id,
        nano_to_usd(p.amount),
        p.amount,
        p.status,
        p.transfer_id,
        p.failure,
        p.requested_at,
        p.decided_at,
        p.finished_at,
    )


async def payout_figures(pool: PoolState, user_id: int) -> PayoutFigures:
    """A provider's earnings in escrow, available and being paid out, and its payouts."""
    await pool.leases.flush()  # earnings booked in this process but not yet written
    async with pool.engine.connect() as conn:
        money = await ledger.balances(conn, user_id)
    settings = pool.settings
    return PayoutFigures(
        nano_to_usd(money.escrowed),
        nano_to_usd(money.earnings),
        nano_to_usd(money.payout_pending),
        nano_to_usd(settings.payout_minimum),
        settings.payout_hold_days,
        await payouts.account_of(pool.engine, user_id) is not None,
        money.escrowed,
        money.earnings,
        money.payout_pending,
        [payout_out(p) for p in await payouts.listed(pool.engine, user_id=user_id)],
    )


async def credit_figures(pool: PoolState, user_id: int) -> Credits:
    """The user's balance, held and available credits, as of now."""
    # Write this process's booked charges and hand back its idle credit lease first; what a lease
    # still holds beyond its running requests counts as available, so "held" is what requests hold.
    try:
        await pool.leases.flush(close_all=True, user_id=user_id)
    except Exception as exc:  # the figures are then as of the last flush
        log.warning("ledger flush before a balance read failed", extra={"error": str(exc)})
    async with pool.engine.connect() as conn:
        money = await ledger.balances(conn, user_id)
    unspent = pool.leases.unspent(user_id)
    held, available = money.held - unspent, money.available + unspent
    total = available + held
    return Credits(
        nano_to_usd(total),
        nano_to_usd(held),
        nano_to_usd(available),
        total,
        held,
        available,
        nano_to_usd(money.owed),
        money.owed,
    )


def _unless_refunded(amount: Any) -> Any:
    """An amount as it stands: a refunded request's cost (and earnings) went back."""
    return case((_log.c.refunded.is_(True), 0), else_=amount)


async def _daily(
    pool: PoolState, who: Any, amount: Any, first: str, last: str, *, by_kind: bool = False
) -> list[tuple[Any, ...]]:
    """Per day and model (and kind, with ``by_kind``: the kind comes after the model), for the rows
    ``who`` selects: requests, failures, tokens in/out, ``amount``. Requests refused before a model
    was read (a body that isn't JSON, say) belong to no model and cost nothing: they are in
    ``/v1/generation/{id}``, not here."""
    await pool.requests.flush()
    keys = (_log.c.day, _log.c.model, *((_log.c.kind,) if by_kind else ()))
    query = (
        select(
            *keys,
            func.count(),
            func.sum(case((_log.c.status != 200, 1), else_=0)),
            func.sum(_log.c.prompt_tokens),
            func.sum(_log.c.completion_tokens),
            func.sum(amount),
        )
        .where(who, _log.c.model != "", _log.c.day >= first, _log.c.day <= last)
        .group_by(*keys)
        .order_by(*keys)
    )
    async with pool.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    width = len(keys)
    return [(*row[:width], *(int(v or 0) for v in row[width:])) for row in rows]


async def usage_by_day(pool: PoolState, user_id: int, first: str, last: str) -> Usage:
    rows = await _daily(pool, _log.c.user_id == user_id, _unless_refunded(_log.c.cost), first, last, by_kind=True)
    data = [
        UsageRow(day, model, n, failed, p, c, nano_to_usd(cost), cost, kind)
        for day, model, kind, n, failed, p, c, cost in rows
    ]
    totals: dict[str, list[int]] = {}
    for row in data:
        total = totals.setdefault(row.kind, [0, 0, 0, 0])
        for i, value in enumerate((row.requests, row.promptTokens, row.completionTokens, row.costNano)):
            total[i] += value
    by_kind = [KindTotal(kind, n, p, c, nano_to_usd(cost), cost) for kind, (n, p, c, cost) in totals.items()]
    by_kind.sort(key=lambda total: (-total.costNano, total.kind))
    return Usage(first, last, data, by_kind)


async def recent_requests(pool: PoolState, user_id: int, limit: int = 20) -> list[Generation]:
    """The user's latest requests, newest first."""
    await pool.requests.flush()
    query = select(_log).where(_log.c.user_id == user_id).order_by(_log.c.created_at.desc()).limit(limit)
    async with pool.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [_generation(row) for row in rows]


def _generation(r: Any) -> Generation:
    provider = r.provider_user_id if r.provider_user_id is not None else ("platform" if r.fallback else None)
    return Generation(
        id=r.id,
        model=r.model,
        createdAt=r.created_at,
        status=r.status,
        errorCode=r.error_code,
        stream=r.stream,
        fallback=r.fallback,
        provider=provider,
        agentId=r.agent_id,
        latencyMs=r.latency_ms,
        ttftMs=r.ttft_ms,
        promptTokens=r.prompt_tokens,
        completionTokens=r.completion_tokens,
        reportedPromptTokens=r.reported_prompt_tokens,
        reportedCompletionTokens=r.reported_completion_tokens,
        usageCapped=r.usage_capped,
        costUsd=nano_to_usd(r.cost),
        costNano=r.cost,
        refunded=r.refunded,
        keyId=r.key_id,
        project=r.project,
        user=r.end_user,
        metadata=msgspec.json.decode(r.tags) if r.tags else None,
        dlp=msgspec.json.decode(r.dlp) if r.dlp else None,
        kind=r.kind,
    )


MAX_DAYS = 366  # the longest range of days a statement covers


def day_range(start: str | None, end: str | None) -> tuple[str, str]:
    """Validate an inclusive ``YYYY-MM-DD`` range (default: the last 30 days, UTC); a 400
    :class:`PoolError` naming the parameter that is wrong."""
    today = datetime.now(UTC).date()
    parsed: list[date] = []
    for name, value, default in (("from", start, today - timedelta(days=29)), ("to", end, today)):
        if value is None:
            parsed.append(default)
            continue
        try:
            parsed.append(date.fromisoformat(value))
        except ValueError:
            raise PoolError(400, errors.INVALID_REQUEST, f"`{name}` must be a date (YYYY-MM-DD).", param=name) from None
    first, last = parsed
    if first > last:
        raise PoolError(400, errors.INVALID_REQUEST, "`from` must not be after `to`.", param="from")
    if (last - first).days >= MAX_DAYS:
        raise PoolError(400, errors.INVALID_REQUEST, f"A range covers at most {MAX_DAYS} days.", param="from")
    return first.isoformat(), last.isoformat()


@dataclass(frozen=True)
class RequestFilter:
    """Which of a user's requests to list; ``None`` matches anything."""

    since: datetime
    until: datetime  # exclusive
    key_id: int | None = None
    project: str | None = None
    model: str | None = None
    status: int | None = None
    provider: str | None = None  # a provider's user id, or ``platform``

    @classmethod
    def over(
        cls,
        first: str,
        last: str,
        key_id: int | None = None,
        project: str | None = None,
        model: str | None = None,
        status: int | None = None,
        provider: str | None = None,
    ) -> RequestFilter:
        """The filter for the UTC days ``first`` to ``last`` (as :func:`day_range` gives them)."""
        since = datetime.fromisoformat(first).replace(tzinfo=UTC)
        until = datetime.fromisoformat(last).replace(tzinfo=UTC) + timedelta(days=1)
        return cls(since, until, key_id, project, model, status, provider)


class RequestPage(msgspec.Struct):
    data: list[Generation]
    nextCursor: str | None  # pass as ``cursor`` for the next (older) page; ``null``: the last page


def cursor_for(created_at: datetime, request_id: str) -> str:
    raw = f"{created_at.astimezone(UTC).isoformat()}|{request_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor_position(cursor: str) -> tuple[datetime, str]:
    """Where a cursor points; ``ValueError`` if it is not one of ours."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    at, _, request_id = raw.partition("|")
    if not request_id:
        raise ValueError("not a cursor")
    return datetime.fromisoformat(at), request_id


async def list_requests(
    pool: PoolState, user_id: int, where: RequestFilter, cursor: tuple[datetime, str] | None, limit: int
) -> RequestPage:
    """A page of the user's requests, newest first, matching ``where``, after ``cursor``."""
    await pool.requests.flush()  # rows still in memory first
    c = _log.c
    query = select(_log).where(c.user_id == user_id, c.created_at >= where.since, c.created_at < where.until)
    for column, value in ((c.key_id, where.key_id), (c.project, where.project), (c.model, where.model)):
        if value is not None:
            query = query.where(column == value)
    if where.status is not None:
        query = query.where(c.status == where.status)
    if where.provider == "platform":
        query = query.where(c.fallback.is_(True))
    elif where.provider is not None:
        query = query.where(c.provider_user_id == int(where.provider))
    if cursor is not None:
        at, request_id = cursor
        query = query.where(or_(c.created_at < at, and_(c.created_at == at, c.id < request_id)))
    query = query.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)
    async with pool.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    page = [_generation(row) for row in rows[:limit]]
    more = len(rows) > limit
    return RequestPage(page, cursor_for(rows[limit - 1].created_at, rows[limit - 1].id) if more else None)


CSV_COLUMNS = (
    "id",
    "createdAt",
    "keyId",
    "project",
    "user",
    "model",
    "kind",
    "status",
    "errorCode",
    "stream",
    "fallback",
    "provider",
    "agentId",
    "latencyMs",
    "ttftMs",
    "promptTokens",
    "completionTokens",
    "costUsd",
    "refunded",
    "dlp",
    "metadata",
)


def as_csv(page: RequestPage) -> str:
    """The page as CSV, one row per request (``metadata`` as JSON), with a header row."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for g in page.data:
        metadata = msgspec.json.encode(g.metadata).decode() if g.metadata else ""
        row: list[object] = [getattr(g, name) for name in CSV_COLUMNS[:-2]]
        row.append(" ".join(f"{name}:{n}" for name, n in (g.dlp or {}).items()))
        cells = ["" if v is None else v.isoformat() if isinstance(v, datetime) else v for v in row] + [metadata]
        writer.writerow([_inert(cell) for cell in cells])
    return out.getvalue()


def _inert(cell: object) -> object:
    """A cell a spreadsheet shows as text: one the consumer wrote (``user``, ``project``, tags)
    that starts like a formula gets a leading quote, as OWASP advises against CSV injection."""
    if isinstance(cell, str) and cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + cell
    return cell


async def earnings_by_day(pool: PoolState, user_id: int, first: str, last: str) -> Earnings:
    rows = await _daily(pool, _log.c.provider_user_id == user_id, _unless_refunded(_log.c.provider_earned), first, last)
    await pool.leases.flush()  # earnings booked in this process but not yet written
    async with pool.engine.connect() as conn:
        money = await ledger.balances(conn, user_id)
    data = [EarningsRow(day, model, n, p, c, nano_to_usd(e), e) for day, model, n, _, p, c, e in rows]
    total = money.earnings + money.escrowed
    return Earnings(
        nano_to_usd(total),
        total,
        first,
        last,
        data,
        nano_to_usd(money.escrowed),
        money.escrowed,
        nano_to_usd(money.earnings),
        money.earnings,
    )


async def generation_of(pool: PoolState, user_id: int, generation_id: str) -> Generation | None:
    """One of the user's requests, logged or still waiting to be (``None``: not the user's, or none)."""
    pending: RequestRecord | None = pool.requests.unflushed(generation_id)
    if pending is not None and pending.user_id == user_id:
        return _generation(pending)
    async with pool.engine.connect() as conn:
        row = (await conn.execute(select(_log).where(_log.c.id == generation_id, _log.c.user_id == user_id))).first()
    return None if row is None else _generation(row)


async def key_spend(pool: PoolState, user_id: int, key_id: int) -> tuple[int, int]:
    """What one of the user's keys spent today and this month (UTC), nano-USD, refunds taken off."""
    await pool.requests.flush()
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    spent = func.coalesce(func.sum(_unless_refunded(_log.c.cost)), 0)
    mine = (_log.c.user_id == user_id) & (_log.c.key_id == key_id)
    async with pool.engine.connect() as conn:
        day = (await conn.execute(select(spent).where(mine, _log.c.day == today))).scalar()
        month = (await conn.execute(select(spent).where(mine, _log.c.day.startswith(today[:8])))).scalar()
    return int(day or 0), int(month or 0)
