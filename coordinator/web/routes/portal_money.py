"""The portal's money pages and forms: the credit transactions and monthly statements, "Add
credits" (to Stripe Checkout and back), and a provider's payout account and payout requests. Same
session, cookie and CSRF rules as every portal form; each form answers with a redirect, to Stripe or
back to the page with what happened (``?done=…``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Request, Response, Router, get, post
from litestar.response import Redirect, Template
from sqlalchemy import select

from coordinator.core.models import User
from coordinator.money import payments, payouts
from coordinator.services.payments import BadAmount, PaymentsUnavailable, TooManyCheckouts, whole_cents
from coordinator.services.state import pool_of
from coordinator.services.statements import credit_figures
from coordinator.services.transactions import statement, statement_csv, transactions
from coordinator.web.portal_cookies import base_context, csrf_ok, csrf_token, page_headers, page_user

HOME, PROVIDER, LOGIN, CREDITS = "/portal", "/portal/provider", "/portal/login", "/portal/credits"


async def _form(request: Request[Any, Any, Any]) -> dict[str, str] | None:
    """The posted form if its token is good, else ``None``."""
    form = {key: value for key, value in (await request.form()).items() if isinstance(value, str)}
    return form if csrf_ok(request, form) else None


def _back(page: str, done: str) -> Redirect:
    return Redirect(f"{page}?done={done}", status_code=303)


@get("/credits", summary="Your credit transactions, and monthly statements to download")
async def credits_page(request: Request[Any, Any, Any], cursor: str | None = None) -> Template | Redirect:
    user_id = await page_user(request)
    if user_id is None:
        return Redirect(LOGIN)
    pool = pool_of(request)
    error = "Choose a month (YYYY-MM)." if request.query_params.get("error") == "month" else ""
    try:
        listed = await transactions(pool, user_id, cursor, 100)
    except ValueError:
        listed, error = await transactions(pool, user_id, None, 100), "That link had expired: showing the newest."
    async with pool.db_sessions() as session:
        email = await session.scalar(select(User.email).where(User.id == user_id))
    csrf, cookie = csrf_token(request)
    context = {
        **base_context(request, "portal"),
        "csrf": csrf,
        "email": email,
        "credits": await credit_figures(pool, user_id),
        "listed": listed,
        "month": datetime.now(UTC).strftime("%Y-%m"),
        "error": error,
        "auto": await payments.auto_of(pool.engine, user_id),
        "done": request.query_params.get("done"),
    }
    return Template("portal/credits.html", context=context, cookies=[cookie] if cookie else [])


@get("/credits/statement.csv", summary="A month's statement as CSV (the portal's download)")
async def statement_download(request: Request[Any, Any, Any], month: str = "") -> Response[str] | Redirect:
    user_id = await page_user(request)
    if user_id is None:
        return Redirect(LOGIN)
    chosen = month or datetime.now(UTC).strftime("%Y-%m")
    try:
        found = await statement(pool_of(request), user_id, chosen)
    except ValueError:
        return Redirect("/portal/credits?error=month")
    headers = {"content-disposition": f'attachment; filename="statement-{chosen}.csv"'}
    return Response(statement_csv(found), media_type="text/csv; charset=utf-8", headers=headers)


@post("/credits/auto", summary="Automatic top-ups on or off, threshold and amount (form)", status_code=200)
async def auto_top_up(request: Request[Any, Any, Any]) -> Redirect:
    user_id = await page_user(request)
    if user_id is None:
        return Redirect(LOGIN, status_code=303)
    form = await _form(request)
    if form is None:
        return _back(CREDITS, "expired")
    settings = pool_of(request).settings
    try:
        threshold = whole_cents(form.get("threshold", "").strip().removeprefix("$"), 1, settings.topup_max)
        amount = whole_cents(form.get("amount", "").strip().removeprefix("$"), settings.topup_min, settings.topup_max)
    except BadAmount:
        return _back(CREDITS, "auto-amount")
    enabled = form.get("enabled") == "1"
    if not await payments.set_auto(pool_of(request).engine, user_id, enabled, threshold, amount):
        return _back(CREDITS, "auto-card")
    return _back(CREDITS, "auto-on" if enabled else "auto-off")


@post("/credits/checkout", summary="Add credits (form): on to Stripe Checkout", status_code=200)
async def add_credits(request: Request[Any, Any, Any]) -> Redirect:
    user_id = await page_user(request)
    if user_id is None:
        return Redirect(LOGIN, status_code=303)
    form = await _form(request)
    if form is None:
        return _back(HOME, "expired")
    chosen = form.get("amount", "")  # a preset's button, or "custom": the typed amount
    amount = (form.get("custom", "") if chosen == "custom" else chosen).strip().removeprefix("$")
    try:
        _, url = await pool_of(request).payments.checkout(user_id, amount, "/portal/", form.get("save") == "1")
    except BadAmount:
        return _back(HOME, "topup-amount")
    except (PaymentsUnavailable, TooManyCheckouts):
        return _back(HOME, "payments-unavailable")
    return Redirect(url, status_code=303)


@post("/payouts/account", summary="Connect a payout account (form): on to onboarding", status_code=200)
async def connect_account(request: Request[Any, Any, Any]) -> Redirect:
    user_id = await page_user(request)
    if user_id is None:
        return Redirect(LOGIN, status_code=303)
    if await _form(request) is None:
        return _back(PROVIDER, "expired")
    try:
        url = await pool_of(request).payments.onboarding_link(user_id, PROVIDER)
    except PaymentsUnavailable:
        return _back(PROVIDER, "payments-unavailable")
    return Redirect(url, status_code=303)


@post("/payouts/request", summary="Ask for a payout of matured earnings (form)", status_code=200)
async def ask_payout(request: Request[Any, Any, Any]) -> Redirect:
    user_id = await page_user(request)
    if user_id is None:
        return Redirect(LOGIN, status_code=303)
    form = await _form(request)
    if form is None:
        return _back(PROVIDER, "expired")
    try:
        await pool_of(request).payments.request_payout(user_id, form.get("amount", "").strip().removeprefix("$"))
    except BadAmount:
        return _back(PROVIDER, "payout-amount")
    except payouts.PayoutRefused as exc:
        return _back(PROVIDER, exc.code.replace("_", "-"))
    return _back(PROVIDER, "payout-requested")


portal_money = Router(
    "/portal",
    route_handlers=[credits_page, statement_download, auto_top_up, add_credits, connect_account, ask_payout],
    response_headers=page_headers("no-store"),
    tags=["pages"],
)
