"""The operator console under ``/admin``, for users with the admin role (``pool-coordinator admin
set-role``): users with their balances, held credit and debt, and credit adjustments with a reason;
payouts waiting for approval; connected agents and their trust; the ledger's health, checked on
demand. The portal's session cookie, CSRF tokens and page headers apply; to anyone else (signed in
or not) the console does not exist (404), so it is not advertised."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Router, get, post
from litestar.params import Parameter
from litestar.response import Redirect, Template

from coordinator.core.errors import PoolError
from coordinator.core.models import User
from coordinator.money import ledger, payouts
from coordinator.services import console
from coordinator.services.payments import BadAmount, PaymentsUnavailable, whole_cents
from coordinator.services.state import PoolState, pool_of
from coordinator.services.statements import payout_out
from coordinator.web.portal_cookies import base_context, csrf_ok, csrf_token, page_headers, page_user
from shared import errors

UserId = Annotated[int, Parameter(ge=1, le=2**31 - 1)]
PayoutId = Annotated[str, Parameter(pattern=r"^po_[0-9a-f]{24}$")]
ADMIN = "admin"


async def _operator(request: Request[Any, Any, Any]) -> User | Redirect:
    """The signed-in admin; without a session, the way to log in; 404 for anyone else."""
    user_id = await page_user(request)
    if user_id is None:
        return Redirect("/portal/login", status_code=303)
    async with pool_of(request).db_sessions() as session:
        user = await session.get(User, user_id)
    if user is None or user.role != ADMIN:
        raise PoolError(404, errors.NOT_FOUND, "No such page.")
    return user


def _page(request: Request[Any, Any, Any], name: str, section: str, operator: User, **context: Any) -> Template:
    csrf, cookie = csrf_token(request)
    frame = {**base_context(request, "admin"), "csrf": csrf, "email": operator.email, "admin": True}
    return Template(
        f"admin/{name}.html",
        context={**frame, "section": section, "done": request.query_params.get("done"), **context},
        cookies=[cookie] if cookie else [],
    )


async def _form(request: Request[Any, Any, Any]) -> dict[str, str] | None:
    form = {key: value for key, value in (await request.form()).items() if isinstance(value, str)}
    return form if csrf_ok(request, form) else None


def _back(path: str, done: str) -> Redirect:
    return Redirect(f"{path}{'&' if '?' in path else '?'}done={done}", status_code=303)


@get("/", summary="The operator console: the pool at a glance and the ledger's totals")
async def overview(request: Request[Any, Any, Any], pool: PoolState) -> Template | Redirect:
    operator = await _operator(request)
    if isinstance(operator, Redirect):
        return operator
    waiting = await payouts.listed(pool.engine, status=payouts.REQUESTED, limit=500)
    return _page(
        request,
        "overview",
        "overview",
        operator,
        agents=len(pool.registry),
        waiting=len(waiting),
        waiting_nano=sum(p.amount for p in waiting),
    )


@get("/users", summary="Users with their balances, held credit and debt")
async def users_list(
    request: Request[Any, Any, Any], pool: PoolState, q: str = "", offset: int = 0
) -> Template | Redirect:
    operator = await _operator(request)
    if isinstance(operator, Redirect):
        return operator
    rows, more = await console.users_page(pool.engine, q.strip()[:320], max(0, offset))
    return _page(
        request, "users", "users", operator, rows=rows, more=more, q=q, offset=max(0, offset), page=console.PAGE
    )


@post("/users/{user_id:int}/credits", summary="Give or take credit with a reason (form)", status_code=200)
async def adjust_credits(request: Request[Any, Any, Any], pool: PoolState, user_id: UserId) -> Redirect:
    operator = await _operator(request)
    if isinstance(operator, Redirect):
        return operator
    form = await _form(request)
    if form is None:
        return _back("/admin/users", "expired")
    reason = form.get("reason", "").strip()
    if not reason or len(reason) > 150:
        return _back("/admin/users", "reason")
    raw = form.get("amount", "").strip().removeprefix("$")
    sign = -1 if raw.startswith("-") else 1
    try:
        amount = sign * whole_cents(raw.lstrip("+-"), 1, ledger.MAX_GRANT_USD * 10**9)
    except BadAmount:
        return _back("/admin/users", "amount")
    try:
        await console.adjust(pool, user_id, amount, reason, operator.email)
    except ledger.InsufficientCredits:
        return _back("/admin/users", "short")
    except LookupError:
        return _back("/admin/users", "missing")
    return _back("/admin/users", "adjusted")


@get("/payouts", summary="Payouts waiting for approval, and the latest others")
async def payouts_list(request: Request[Any, Any, Any], pool: PoolState) -> Template | Redirect:
    operator = await _operator(request)
    if isinstance(operator, Redirect):
        return operator
    waiting = [payout_out(p) for p in await payouts.listed(pool.engine, status=payouts.REQUESTED, limit=500)]
    latest = [payout_out(p) for p in await payouts.listed(pool.engine, limit=100) if p.status != payouts.REQUESTED]
    return _page(request, "payouts", "payouts", operator, waiting=waiting, latest=latest)


@post(
    "/payouts/{payout_id:str}/{decision:str}",
    summary="Approve (and transfer) or reject a payout (form)",
    status_code=200,
)
async def decide_payout(
    request: Request[Any, Any, Any], pool: PoolState, payout_id: PayoutId, decision: str
) -> Redirect:
    operator = await _operator(request)
    if isinstance(operator, Redirect):
        return operator
    form = await _form(request)
    if form is None:
        return _back("/admin/payouts", "expired")
    try:
        if decision == "approve":
            done = await pool.payments.approve(payout_id, operator.email)
            return _back("/admin/payouts", "paid" if done.status == payouts.PAID else "transfer-failed")
        if decision == "reject":
            reason = form.get("reason", "").strip()[:500] or "rejected by the operator"
            await pool.payments.reject(payout_id, operator.email, reason)
            return _back("/admin/payouts", "rejected")
    except payouts.PayoutRefused:
        return _back("/admin/payouts", "moved")
    except PaymentsUnavailable:
        return _back("/admin/payouts", "unreachable")
    raise PoolError(404, errors.NOT_FOUND, "No such page.")


@get("/agents", summary="Connected agents and their trust")
async def agents_list(request: Request[Any, Any, Any], pool: PoolState) -> Template | Redirect:
    operator = await _operator(request)
    if isinstance(operator, Redirect):
        return operator
    return _page(
        request, "agents", "agents", operator, rows=console.agents(pool), threshold=pool.settings.trust_threshold
    )


@get("/ledger", summary="The ledger's health: every invariant checked now")
async def ledger_page(request: Request[Any, Any, Any], pool: PoolState) -> Template | Redirect:
    operator = await _operator(request)
    if isinstance(operator, Redirect):
        return operator
    return _page(request, "ledger", "ledger", operator, health=await console.ledger_health(pool.engine))


console_pages = Router(
    "/admin",
    route_handlers=[overview, users_list, adjust_credits, payouts_list, decide_payout, agents_list, ledger_page],
    response_headers=page_headers("no-store"),
    tags=["pages"],
)
