"""A user's money, read-only: credits, usage by day and model, one generation, the audit list of
requests (with filters, pages and CSV), provider earnings.

Open to a portal session or one of the user's consumer keys; every query is scoped to that user.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from litestar import MediaType, Request, Response, Router, get
from litestar.params import Parameter

from coordinator.core.errors import PoolError
from coordinator.services.state import PoolState, pool_of
from coordinator.services.statements import (
    Credits,
    Earnings,
    Generation,
    RequestFilter,
    RequestPage,
    Usage,
    as_csv,
    credit_figures,
    cursor_position,
    day_range,
    earnings_by_day,
    generation_of,
    list_requests,
    usage_by_day,
)
from coordinator.services.transactions import Transactions, statement, statement_csv, transactions
from coordinator.web.guards import require_account
from shared import errors


def _pool(request: Request[Any, Any, Any]) -> PoolState:
    return pool_of(request)


@get("/credits", summary="Your credit balance, what is held for running requests, and what is available")
async def credits(request: Request[Any, Any, Any]) -> Credits:
    return await credit_figures(_pool(request), request.state.user_id)


FROM = Parameter(query="from", default=None, description="first day, YYYY-MM-DD (UTC)")
TO = Parameter(query="to", default=None, description="last day, YYYY-MM-DD (UTC)")


@get(
    "/credits/transactions",
    summary="What changed your balance, newest first: top-ups, refunds, reversals, adjustments, spend per day",
)
async def credit_transactions(
    request: Request[Any, Any, Any],
    cursor: Annotated[str | None, Parameter(max_length=200)] = None,
    limit: Annotated[int, Parameter(ge=1, le=500)] = 100,
) -> Transactions:
    try:
        return await transactions(_pool(request), request.state.user_id, cursor, limit)
    except ValueError:
        raise PoolError(400, errors.INVALID_REQUEST, "`cursor` is not one this API gave out.", param="cursor") from None


@get(
    "/credits/statement",
    summary="A month's statement as CSV: opening balance, every line, closing balance",
    media_type="text/csv",
)
async def credit_statement(
    request: Request[Any, Any, Any],
    month: Annotated[
        str | None, Parameter(pattern=r"^[0-9]{4}-[0-9]{2}$", description="YYYY-MM (UTC); default: this month")
    ] = None,
) -> Response[str]:
    chosen = month or datetime.now(UTC).strftime("%Y-%m")
    try:
        found = await statement(_pool(request), request.state.user_id, chosen)
    except ValueError:
        raise PoolError(400, errors.INVALID_REQUEST, "`month` must be a month (YYYY-MM).", param="month") from None
    headers = {"content-disposition": f'attachment; filename="statement-{chosen}.csv"'}
    return Response(statement_csv(found), media_type="text/csv; charset=utf-8", headers=headers)


@get("/usage", summary="Your requests, tokens and cost per day and model")
async def usage(request: Request[Any, Any, Any], from_date: str | None = FROM, to_date: str | None = TO) -> Usage:
    return await usage_by_day(_pool(request), request.state.user_id, *day_range(from_date, to_date))


@get("/generation/{generation_id:str}", summary="One of your requests: tokens, cost, provider, latency, fallback")
async def generation(request: Request[Any, Any, Any], generation_id: str) -> Generation:
    found = await generation_of(_pool(request), request.state.user_id, generation_id)
    if found is None:
        raise PoolError(404, errors.NOT_FOUND, "No such generation (it may take a second to appear).", param="id")
    return found


@get(
    "/requests",
    summary="Your requests, newest first, with filters and pages (format=csv: a CSV file); never prompts or keys",
)
async def requests(
    request: Request[Any, Any, Any],
    from_date: str | None = FROM,
    to_date: str | None = TO,
    key: Annotated[int | None, Parameter(query="key", ge=1, le=2**31 - 1)] = None,
    project: Annotated[str | None, Parameter(max_length=100)] = None,
    model: Annotated[str | None, Parameter(max_length=200)] = None,
    status: Annotated[int | None, Parameter(ge=100, le=599)] = None,
    provider: Annotated[str | None, Parameter(pattern=r"^(platform|[0-9]{1,10})$")] = None,
    cursor: Annotated[str | None, Parameter(max_length=200)] = None,
    limit: Annotated[int, Parameter(ge=1, le=500)] = 100,
    format: Literal["json", "csv"] = "json",
) -> Response[Any]:
    first, last = day_range(from_date, to_date)
    try:
        position = None if cursor is None else cursor_position(cursor)
    except ValueError:
        raise PoolError(400, errors.INVALID_REQUEST, "`cursor` is not one this API gave out.", param="cursor") from None
    where = RequestFilter.over(first, last, key, project, model, status, provider)
    page: RequestPage = await list_requests(_pool(request), request.state.user_id, where, position, limit)
    if format == "csv":
        headers = {"content-disposition": 'attachment; filename="requests.csv"'}
        if page.nextCursor:
            headers["x-next-cursor"] = page.nextCursor
        return Response(as_csv(page), media_type="text/csv; charset=utf-8", headers=headers)
    return Response(page, media_type=MediaType.JSON)


@get("/provider/earnings", summary="What your agents earned, per day and model, and your earnings balance")
async def provider_earnings(
    request: Request[Any, Any, Any], from_date: str | None = FROM, to_date: str | None = TO
) -> Earnings:
    return await earnings_by_day(_pool(request), request.state.user_id, *day_range(from_date, to_date))


account_router = Router(
    "/v1",
    route_handlers=[credits, credit_transactions, credit_statement, usage, generation, requests, provider_earnings],
    guards=[require_account],
    tags=["account"],
)
