"""A user's money, read-only: credits, usage by day and model, one generation, provider earnings.

Open to a portal session or one of the user's consumer keys; every query is scoped to that user.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from litestar import Request, Router, get
from litestar.params import Parameter

from coordinator.core.errors import PoolError
from coordinator.services.state import PoolState, pool_of
from coordinator.services.statements import (
    Credits,
    Earnings,
    Generation,
    Usage,
    credit_figures,
    earnings_by_day,
    generation_of,
    usage_by_day,
)
from coordinator.web.guards import require_account
from shared import errors

MAX_DAYS = 366


def _pool(request: Request[Any, Any, Any]) -> PoolState:
    return pool_of(request)


def _date_range(start: str | None, end: str | None) -> tuple[str, str]:
    """Validate an inclusive ``YYYY-MM-DD`` range (default: the last 30 days, UTC)."""
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


@get("/credits", summary="Your credit balance, what is held for running requests, and what is available")
async def credits(request: Request[Any, Any, Any]) -> Credits:
    return await credit_figures(_pool(request), request.state.user_id)


FROM = Parameter(query="from", default=None, description="first day, YYYY-MM-DD (UTC)")
TO = Parameter(query="to", default=None, description="last day, YYYY-MM-DD (UTC)")


@get("/usage", summary="Your requests, tokens and cost per day and model")
async def usage(request: Request[Any, Any, Any], from_date: str | None = FROM, to_date: str | None = TO) -> Usage:
    return await usage_by_day(_pool(request), request.state.user_id, *_date_range(from_date, to_date))


@get("/generation/{generation_id:str}", summary="One of your requests: tokens, cost, provider, latency, fallback")
async def generation(request: Request[Any, Any, Any], generation_id: str) -> Generation:
    found = await generation_of(_pool(request), request.state.user_id, generation_id)
    if found is None:
        raise PoolError(404, errors.NOT_FOUND, "No such generation (it may take a second to appear).", param="id")
    return found


@get("/provider/earnings", summary="What your agents earned, per day and model, and your earnings balance")
async def provider_earnings(
    request: Request[Any, Any, Any], from_date: str | None = FROM, to_date: str | None = TO
) -> Earnings:
    return await earnings_by_day(_pool(request), request.state.user_id, *_date_range(from_date, to_date))


account_router = Router(
    "/v1", route_handlers=[credits, usage, generation, provider_earnings], guards=[require_account], tags=["account"]
)
