"""Operator API (``Authorization: Bearer $POOL_ADMIN_TOKEN``): idempotent credit top-ups."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.params import Parameter
from msgspec import Meta
from sqlalchemy import select

from coordinator.core.errors import PoolError
from coordinator.core.models import User
from coordinator.identity import users
from coordinator.money import ledger
from coordinator.services.state import PoolState
from coordinator.web.guards import require_admin
from shared import errors
from shared.money import NANO_PER_USD, usd_to_nano


class TopupIn(msgspec.Struct, forbid_unknown_fields=True):
    amountUsd: str | float | int
    email: str | None = None
    userId: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None


class TopupOut(msgspec.Struct):
    userId: int
    amountUsd: float
    amountNano: int
    transactionId: str
    createdAt: datetime


async def user_id_for(pool: PoolState, email: str | None, user_id: int | None) -> int:
    if (email is None) == (user_id is None):
        raise PoolError(400, errors.INVALID_REQUEST, "Give exactly one of `email` and `userId`.", param="email")
    async with pool.db_sessions() as session:
        if email is not None:
            try:
                found = await session.scalar(select(User.id).where(User.email == users.normalize_email(email)))
            except users.AccountError:
                found = None
        else:
            found = await session.scalar(select(User.id).where(User.id == user_id))
    if found is None:
        raise PoolError(404, errors.NOT_FOUND, "No such user.", param="email" if email is not None else "userId")
    return int(found)


@post(
    "/v1/admin/credits",
    guards=[require_admin],
    summary="Grant credits to a user, once per Idempotency-Key",
    description="The same key with the same body returns the same result without a second grant; "
    "the same key with a different body is refused with 422.",
    tags=["admin"],
    status_code=201,
)
async def grant_credits(
    request: Request[Any, Any, Any],
    data: TopupIn,
    idempotency_key: Annotated[str, Parameter(header="Idempotency-Key", min_length=1, max_length=200)],
    pool: PoolState,
) -> Response[TopupOut]:
    try:
        amount = usd_to_nano(data.amountUsd, ledger.MAX_GRANT_USD)
    except ValueError as exc:
        raise PoolError(400, errors.INVALID_REQUEST, f"`amountUsd` {exc}.", param="amountUsd") from None
    user_id = await user_id_for(pool, data.email, data.userId)
    try:
        result = await ledger.topup(pool.engine, idempotency_key, user_id, amount)
    except ledger.IdempotencyConflict:
        raise PoolError(
            422,
            errors.IDEMPOTENCY_CONFLICT,
            "This Idempotency-Key was already used with a different request.",
            param="Idempotency-Key",
        ) from None
    body = TopupOut(result.user_id, result.amount / NANO_PER_USD, result.amount, result.tx_id, result.created_at)
    headers = {"idempotent-replayed": "true"} if result.replayed else {}
    return Response(body, status_code=201, headers=headers)
