"""Money in and out over HTTP: a consumer's Checkout top-up, Stripe's webhook, a provider's payout
account and payouts, and the operator's approval of payouts (``POOL_ADMIN_TOKEN``)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Router, get, post, put
from litestar.params import Parameter
from msgspec import Meta

from coordinator.core.errors import PoolError
from coordinator.money import payments, payouts
from coordinator.services.payments import BadAmount, BadSignature, PaymentsUnavailable, TooManyCheckouts, whole_cents
from coordinator.services.state import PoolState
from coordinator.services.statements import PayoutFigures, PayoutOut, payout_figures, payout_out
from coordinator.web.guards import require_account, require_admin, require_session
from shared import errors
from shared.money import nano_to_usd

log = logging.getLogger(__name__)

Amount = str | float | int


class CheckoutIn(msgspec.Struct, forbid_unknown_fields=True):
    amountUsd: Amount
    saveCard: bool = False  # keep the card for automatic top-ups


class AutoTopupIn(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool
    thresholdUsd: Amount  # top up when the balance falls under this
    amountUsd: Amount  # by this much (within the top-up bounds)


class AutoTopupOut(msgspec.Struct):
    cardSaved: bool
    enabled: bool
    thresholdUsd: float
    amountUsd: float
    lastError: str | None


class CheckoutOut(msgspec.Struct):
    paymentId: str
    url: str  # where to send the user to pay


class LinkOut(msgspec.Struct):
    url: str


class PayoutIn(msgspec.Struct, forbid_unknown_fields=True):
    amountUsd: Amount


class RejectIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, Meta(min_length=1, max_length=500)]


def unavailable(exc: PaymentsUnavailable) -> PoolError:
    return PoolError(503, errors.PAYMENTS_UNAVAILABLE, str(exc), headers={"retry-after": "30"})


def refused(exc: payouts.PayoutRefused) -> PoolError:
    status = {"not_found": 404, "payout_below_minimum": 400, "insufficient_earnings": 409}.get(exc.code, 409)
    return PoolError(status, exc.code, exc.message)


def bad_amount(exc: BadAmount) -> PoolError:
    return PoolError(400, errors.INVALID_REQUEST, f"`amountUsd` {exc}.", param="amountUsd")


# --- top-ups ---------------------------------------------------------------------------------------


@post(
    "/credits/checkout",
    guards=[require_session],
    summary="Start a top-up: a Checkout session whose URL the user pays at; the webhook credits it",
    status_code=201,
)
async def create_checkout(request: Request[Any, Any, Any], data: CheckoutIn, pool: PoolState) -> CheckoutOut:
    try:
        payment_id, url = await pool.payments.checkout(request.state.user_id, data.amountUsd, "/portal/", data.saveCard)
    except BadAmount as exc:
        raise bad_amount(exc) from None
    except PaymentsUnavailable as exc:
        raise unavailable(exc) from None
    except TooManyCheckouts as exc:
        raise PoolError(
            429,
            errors.RATE_LIMIT_EXCEEDED,
            "Too many checkouts: finish one or try again later.",
            headers={"retry-after": str(exc.retry_after)},
        ) from None
    return CheckoutOut(payment_id, url)


def auto_out(auto: payments.Auto | None) -> AutoTopupOut:
    if auto is None:
        return AutoTopupOut(False, False, 0.0, 0.0, None)
    return AutoTopupOut(True, auto.enabled, nano_to_usd(auto.threshold), nano_to_usd(auto.amount), auto.last_error)


@get(
    "/credits/auto-topup",
    guards=[require_account],
    summary="Your automatic top-up: whether a card is saved, threshold and amount",
)
async def get_auto_topup(request: Request[Any, Any, Any], pool: PoolState) -> AutoTopupOut:
    return auto_out(await payments.auto_of(pool.engine, request.state.user_id))


@put(
    "/credits/auto-topup",
    guards=[require_session],
    summary="Turn automatic top-ups on or off: the saved card is charged once each time the balance falls low",
    description="Needs a card saved by a Checkout top-up with `saveCard`. One charge per crossing: the next "
    "comes only after the balance was back at the threshold.",
)
async def put_auto_topup(request: Request[Any, Any, Any], data: AutoTopupIn, pool: PoolState) -> AutoTopupOut:
    settings = pool.settings
    try:
        threshold = whole_cents(data.thresholdUsd, 1, settings.topup_max)
        amount = whole_cents(data.amountUsd, settings.topup_min, settings.topup_max)
    except BadAmount as exc:
        raise PoolError(400, errors.INVALID_REQUEST, f"`thresholdUsd` and `amountUsd`: {exc}.") from None
    if not await payments.set_auto(pool.engine, request.state.user_id, data.enabled, threshold, amount):
        raise PoolError(409, errors.CONFLICT, "Save a card first: top up once with `saveCard: true`.")
    return auto_out(await payments.auto_of(pool.engine, request.state.user_id))


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
async def list_payouts(request: Request[Any, Any, Any], pool: PoolState) -> PayoutFigures:
    return await payout_figures(pool, request.state.user_id)


@post(
    "/provider/payouts",
    guards=[require_session],
    summary="Ask for a payout of matured earnings (at least POOL_PAYOUT_MINIMUM_USD); an operator approves it",
    status_code=201,
)
async def create_payout(request: Request[Any, Any, Any], data: PayoutIn, pool: PoolState) -> PayoutOut:
    try:
        return payout_out(await pool.payments.request_payout(request.state.user_id, data.amountUsd))
    except BadAmount as exc:
        raise bad_amount(exc) from None
    except payouts.PayoutRefused as exc:
        raise refused(exc) from None


@post(
    "/provider/payout-account",
    guards=[require_session],
    summary="Connect a payout account: a link to the payment provider's onboarding",
    status_code=200,
)
async def connect_payout_account(request: Request[Any, Any, Any], pool: PoolState) -> LinkOut:
    try:
        return LinkOut(await pool.payments.onboarding_link(request.state.user_id, "/portal/provider"))
    except PaymentsUnavailable as exc:
        raise unavailable(exc) from None


# --- the operator ------------------------------------------------------------------------------


@get("/admin/payouts", guards=[require_admin], summary="Payouts, newest first (status=requested: waiting for approval)")
async def admin_payouts(
    pool: PoolState,
    status: Literal["requested", "approved", "paid", "rejected", "failed"] | None = None,
) -> list[PayoutOut]:
    return [payout_out(p) for p in await payouts.listed(pool.engine, status=status, limit=500)]


PAYOUT_ID = Parameter(pattern=r"^po_[0-9a-f]{24}$")


@post(
    "/admin/payouts/{payout_id:str}/approve",
    guards=[require_admin],
    summary="Approve a payout and transfer it",
    status_code=200,
)
async def admin_approve(pool: PoolState, payout_id: Annotated[str, PAYOUT_ID]) -> PayoutOut:
    try:
        return payout_out(await pool.payments.approve(payout_id, "admin-token"))
    except payouts.PayoutRefused as exc:
        raise refused(exc) from None
    except PaymentsUnavailable as exc:
        raise unavailable(exc) from None


@post(
    "/admin/payouts/{payout_id:str}/reject",
    guards=[require_admin],
    summary="Reject a payout: the amount returns to earnings",
    status_code=200,
)
async def admin_reject(pool: PoolState, payout_id: Annotated[str, PAYOUT_ID], data: RejectIn) -> PayoutOut:
    try:
        return payout_out(await pool.payments.reject(payout_id, "admin-token", data.reason))
    except payouts.PayoutRefused as exc:
        raise refused(exc) from None


payments_router = Router(
    "/v1",
    route_handlers=[
        create_checkout,
        get_auto_topup,
        put_auto_topup,
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
