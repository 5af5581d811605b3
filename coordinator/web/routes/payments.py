"""Money in and out over HTTP: a consumer's Checkout top-up, Stripe's webhook, a provider's payout
account and payouts, and the operator's approval of payouts (``POOL_ADMIN_TOKEN``)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Router, get, post
from litestar.params import Parameter
from msgspec import Meta
from sqlalchemy import select

from coordinator.core.errors import PoolError
from coordinator.core.models import User
from coordinator.money import ledger, payouts
from coordinator.services.payments import NANO_PER_CENT, BadSignature, PaymentsUnavailable
from coordinator.services.state import PoolState
from coordinator.web.guards import require_account, require_admin, require_session
from shared import errors
from shared.money import nano_to_usd, usd_to_nano

log = logging.getLogger(__name__)

Amount = str | float | int


class CheckoutIn(msgspec.Struct, forbid_unknown_fields=True):
    amountUsd: Amount


class CheckoutOut(msgspec.Struct):
    paymentId: str
    url: str  # where to send the user to pay


class LinkOut(msgspec.Struct):
    url: str


class PayoutIn(msgspec.Struct, forbid_unknown_fields=True):
    amountUsd: Amount


class RejectIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, Meta(min_length=1, max_length=500)]


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


class PayoutsOut(msgspec.Struct):
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


def whole_cents(value: Amount, param: str, low: int, high: int) -> int:
    """A USD amount in nano-USD, whole cents between ``low`` and ``high``; 400 otherwise."""
    try:
        amount = usd_to_nano(value, ledger.MAX_GRANT_USD)
    except ValueError as exc:
        raise PoolError(400, errors.INVALID_REQUEST, f"`{param}` {exc}.", param=param) from None
    if amount % NANO_PER_CENT:
        raise PoolError(400, errors.INVALID_REQUEST, f"`{param}` must be whole cents.", param=param)
    if not low <= amount <= high:
        raise PoolError(
            400,
            errors.INVALID_REQUEST,
            f"`{param}` must be between {nano_to_usd(low):.2f} and {nano_to_usd(high):.2f} USD.",
            param=param,
        )
    return amount


def unavailable(exc: PaymentsUnavailable) -> PoolError:
    return PoolError(503, errors.PAYMENTS_UNAVAILABLE, str(exc), headers={"retry-after": "30"})


def refused(exc: payouts.PayoutRefused) -> PoolError:
    status = {"not_found": 404, "payout_below_minimum": 400, "insufficient_earnings": 409}.get(exc.code, 409)
    return PoolError(status, exc.code, exc.message)


async def email_of(pool: PoolState, user_id: int) -> str:
    async with pool.db_sessions() as session:
        return str(await session.scalar(select(User.email).where(User.id == user_id)))


# --- top-ups ---------------------------------------------------------------------------------------


async def start_checkout(pool: PoolState, user_id: int, amount: Amount, back: str) -> CheckoutOut:
    """Open a Checkout session for the user (the API and the portal's form both come here)."""
    settings = pool.settings
    nano = whole_cents(amount, "amountUsd", settings.topup_min, settings.topup_max)
    try:
        payment_id, url = await pool.payments.checkout(user_id, await email_of(pool, user_id), nano, back)
    except PaymentsUnavailable as exc:
        raise unavailable(exc) from None
    return CheckoutOut(payment_id, url)


@post(
    "/credits/checkout",
    guards=[require_session],
    summary="Start a top-up: a Checkout session whose URL the user pays at; the webhook credits it",
    status_code=201,
)
async def create_checkout(request: Request[Any, Any, Any], data: CheckoutIn, pool: PoolState) -> CheckoutOut:
    return await start_checkout(pool, request.state.user_id, data.amountUsd, "/portal/")


@post(
    "/payments/stripe/webhook",
    summary="Stripe's events (checkout, refunds, disputes, transfers), verified by their signature",
    description="Each event is applied once, in any order. A body whose `Stripe-Signature` does not verify "
    "with the endpoint's secret, or is more than five minutes old, is refused with 400 and changes nothing.",
    status_code=200,
)
async def stripe_webhook(
    request: Request[Any, Any, Any],
    pool: PoolState,
    signature: Annotated[str | None, Parameter(header="Stripe-Signature", required=False)] = None,
) -> dict[str, str]:
    payload = await request.body()
    try:
        event = pool.payments.verify(payload, signature)
        outcome = await pool.payments.handle(event)
    except BadSignature as exc:
        log.warning("webhook refused: bad signature")
        raise PoolError(400, errors.INVALID_SIGNATURE, str(exc)) from None
    except PaymentsUnavailable as exc:  # Stripe retries a webhook that was not acknowledged
        raise unavailable(exc) from None
    return {"received": event.id, "outcome": outcome}


# --- payouts -------------------------------------------------------------------------------------


@get("/provider/payouts", guards=[require_account], summary="Your earnings in escrow and available, and your payouts")
async def list_payouts(request: Request[Any, Any, Any], pool: PoolState) -> PayoutsOut:
    user_id = request.state.user_id
    await pool.leases.flush()  # earnings booked in this process but not yet written
    async with pool.engine.connect() as conn:
        money = await ledger.balances(conn, user_id)
    settings = pool.settings
    return PayoutsOut(
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


async def request_payout(pool: PoolState, user_id: int, amount: Amount) -> PayoutOut:
    nano = whole_cents(amount, "amountUsd", 1, ledger.MAX_GRANT_USD * 10**9)
    try:
        found = await payouts.request(pool.engine, payouts.new_id(), user_id, nano, pool.settings.payout_minimum)
    except payouts.PayoutRefused as exc:
        raise refused(exc) from None
    log.info("payout requested", extra={"payout": found.id, "user": user_id, "amount_nano": nano})
    return payout_out(found)


@post(
    "/provider/payouts",
    guards=[require_session],
    summary="Ask for a payout of matured earnings (at least POOL_PAYOUT_MINIMUM_USD); an operator approves it",
    status_code=201,
)
async def create_payout(request: Request[Any, Any, Any], data: PayoutIn, pool: PoolState) -> PayoutOut:
    return await request_payout(pool, request.state.user_id, data.amountUsd)


async def onboarding(pool: PoolState, user_id: int, back: str) -> LinkOut:
    try:
        return LinkOut(await pool.payments.onboarding_link(user_id, await email_of(pool, user_id), back))
    except PaymentsUnavailable as exc:
        raise unavailable(exc) from None


@post(
    "/provider/payout-account",
    guards=[require_session],
    summary="Connect a payout account: a link to the payment provider's onboarding",
    status_code=200,
)
async def connect_payout_account(request: Request[Any, Any, Any], pool: PoolState) -> LinkOut:
    return await onboarding(pool, request.state.user_id, "/portal/provider")


# --- the operator ------------------------------------------------------------------------------


@get("/admin/payouts", guards=[require_admin], summary="Payouts, newest first (status=requested: waiting for approval)")
async def admin_payouts(
    pool: PoolState,
    status: Literal["requested", "approved", "paid", "rejected", "failed"] | None = None,
) -> list[PayoutOut]:
    return [payout_out(p) for p in await payouts.listed(pool.engine, status=status, limit=500)]


async def approve_payout(pool: PoolState, payout_id: str, operator: str) -> PayoutOut:
    """Approve a requested payout and make its transfer (a failed one returns the amount)."""
    try:
        await payouts.approve(pool.engine, payout_id, operator)
        log.info("payout approved", extra={"payout": payout_id, "operator": operator})
        return payout_out(await pool.payments.transfer(payout_id))
    except payouts.PayoutRefused as exc:
        raise refused(exc) from None
    except PaymentsUnavailable as exc:
        raise unavailable(exc) from None


async def reject_payout(pool: PoolState, payout_id: str, operator: str, reason: str) -> PayoutOut:
    try:
        found = await payouts.reject(pool.engine, payout_id, operator, reason)
    except payouts.PayoutRefused as exc:
        raise refused(exc) from None
    log.info("payout rejected", extra={"payout": payout_id, "operator": operator})
    return payout_out(found)


PAYOUT_ID = Parameter(pattern=r"^po_[0-9a-f]{24}$")


@post(
    "/admin/payouts/{payout_id:str}/approve",
    guards=[require_admin],
    summary="Approve a payout and transfer it",
    status_code=200,
)
async def admin_approve(pool: PoolState, payout_id: Annotated[str, PAYOUT_ID]) -> PayoutOut:
    return await approve_payout(pool, payout_id, "admin-token")


@post(
    "/admin/payouts/{payout_id:str}/reject",
    guards=[require_admin],
    summary="Reject a payout: the amount returns to earnings",
    status_code=200,
)
async def admin_reject(pool: PoolState, payout_id: Annotated[str, PAYOUT_ID], data: RejectIn) -> PayoutOut:
    return await reject_payout(pool, payout_id, "admin-token", data.reason)


payments_router = Router(
    "/v1",
    route_handlers=[
        create_checkout,
        stripe_webhook,
        list_payouts,
        create_payout,
        connect_payout_account,
        admin_payouts,
        admin_approve,
        admin_reject,
    ],
    tags=["payments"],
)
