"""The developer portal's pages under ``/portal``: sign up, log in and out; consumer keys, their
policies, credits, usage and recent requests; the list of requests with filters and CSV; the
provider view with agent tokens, connected agents, trust and earnings.

Every page reads through the same functions as the JSON API, scoped to the signed-in user, so a page
shows exactly what the API would show that user and nobody else's data. Sessions and forms: see
``coordinator/web/portal_cookies.py``. Secrets (a new key or token) are shown once, on a page nobody caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.params import Parameter
from litestar.response import Redirect, Template

from coordinator.core import dlp
from coordinator.core.errors import PoolError
from coordinator.core.models import AgentToken, ApiKey, User
from coordinator.identity import policies, users
from coordinator.identity.policies import KeyPolicy, MaxPrice, PolicyError, SpendCap
from coordinator.identity.providers import ProfileError
from coordinator.services import profiles, revocation
from coordinator.services.overview import model_list
from coordinator.services.signin import Credentials, DisplayName, authenticate, end_session, register
from coordinator.services.standing import provider_standing
from coordinator.services.state import PoolState, pool_of
from coordinator.services.statements import (
    RequestFilter,
    RequestPage,
    as_csv,
    credit_figures,
    cursor_position,
    day_range,
    earnings_by_day,
    key_spend,
    list_requests,
    payout_figures,
    recent_requests,
    usage_by_day,
)
from coordinator.web.charts import Chart, columns
from coordinator.web.guards import client_address
from coordinator.web.portal_cookies import (
    base_context,
    csp,
    csrf_ok,
    csrf_token,
    ended_sessions,
    page_headers,
    page_user,
    session_cookie,
    signed_in,
)
from coordinator.web.templating import usd
from shared import errors

DAYS = 14  # days in the usage and earnings charts
CredentialId = Annotated[int, Parameter(ge=1, le=2**31 - 1)]
LOGIN = "/portal/login"


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of credential the portal manages."""

    path: str
    model: type[ApiKey] | type[AgentToken]
    what: str
    home: str  # the page that lists them
    page: str  # its name in the navigation


KINDS = {
    "keys": Kind("keys", ApiKey, "API key", "/portal", "portal"),
    "agent-tokens": Kind("agent-tokens", AgentToken, "agent token", "/portal/provider", "provider"),
}


def _pool(request: Request[Any, Any, Any]) -> PoolState:
    return pool_of(request)


async def _form(request: Request[Any, Any, Any]) -> dict[str, str]:
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str)}


def _page(
    request: Request[Any, Any, Any],
    name: str,
    page: str,
    *,
    status: int = 200,
    cookies: list[Cookie] | None = None,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> Template:
    """Render a page with the frame's context and its forms' token (and the cookie of a new nonce)."""
    csrf, cookie = csrf_token(request)
    frame = {**base_context(request, page), "csrf": csrf, "external": _pool(request).portal.external}
    return Template(
        name,
        context={**frame, **context},
        status_code=status,
        cookies=[*([cookie] if cookie else []), *(cookies or [])],
        headers=headers,
    )


async def _who(request: Request[Any, Any, Any]) -> User | None:
    user_id = await page_user(request)
    if user_id is None:
        return None
    async with _pool(request).db_sessions() as session:
        return await session.get(User, user_id)


def _days(today: date) -> tuple[str, str, list[str]]:
    days = [(today - timedelta(days=n)).isoformat() for n in range(DAYS - 1, -1, -1)]
    return days[0], days[-1], days


def _per_day(what: str, days: list[str], amounts: list[tuple[str, str, int]]) -> Chart:
    """A bar per day (``MM-DD``) of nano-USD amounts, stacked by model; days without any show 0."""
    by_model: dict[str, dict[str, float]] = {}
    for day, model, amount in amounts:
        into = by_model.setdefault(model, {})
        into[day[5:]] = into.get(day[5:], 0) + amount
    labels = [day[5:] for day in days]
    return columns(f"{what} per day and model, last {DAYS} days", labels, by_model, lambda v: usd(int(v)))


# --- signing in and out -------------------------------------------------------------------------


@get("/login", summary="The portal's login page")
async def login_page(request: Request[Any, Any, Any]) -> Template | Redirect:
    if await page_user(request) is not None:
        return Redirect("/portal")
    return _page(request, "portal/sign_in.html", "portal", mode="login")


@get("/signup", summary="The portal's sign-up page")
async def signup_page(request: Request[Any, Any, Any]) -> Template:
    return _page(request, "portal/sign_in.html", "portal", mode="signup")


async def _sign_in(request: Request[Any, Any, Any], mode: str) -> Template | Redirect:
    """Log in, or sign up and then log in with the same credentials (signup itself says nothing of
    whether the email had an account: if it had, only its own password opens it)."""
    pool = _pool(request)
    form = await _form(request)
    if not csrf_ok(request, form):
        return _page(request, "portal/sign_in.html", "portal", mode=mode, status=403, error=_STALE_FORM)
    client = client_address(request)
    try:
        credentials = msgspec.convert(
            {"email": form.get("email", ""), "password": form.get("password", "")}, Credentials
        )
        if mode == "signup":
            await register(pool, credentials, client)
        user = await authenticate(pool, credentials, client)
    except msgspec.ValidationError as exc:
        error = "Enter an email address and a password of at least 8 characters."
        if "email" in str(exc):
            error = "Enter a valid email address."
        return _page(
            request,
            "portal/sign_in.html",
            "portal",
            mode=mode,
            status=400,
            error=error,
            email_value=form.get("email", ""),
        )
    except PoolError as exc:
        if mode == "signup" and exc.status == 403 and pool.settings.signup_approval:
            return _page(request, "portal/sign_in.html", "portal", mode="login", notice=_AWAITING_APPROVAL)
        message = _ALREADY_THERE if mode == "signup" and exc.code == errors.INVALID_CREDENTIALS else exc.message
        return _page(
            request,
            "portal/sign_in.html",
            "portal",
            mode=mode,
            status=exc.status,
            headers=exc.headers or None,  # Retry-After when too many failures came from here
            error=message,
            email_value=form.get("email", ""),
        )
    token = pool.portal.issue(str(user.id))
    return Redirect("/portal", status_code=303, cookies=[session_cookie(request, token, pool.portal.ttl)])


_STALE_FORM = "This form has expired. Please try again."
_ALREADY_THERE = (
    "Could not sign you in with this password. If you already have an account with this email, "
    "log in with that account's password."
)
_AWAITING_APPROVAL = (
    "Thank you for signing up. New accounts on this pool wait for an operator's approval: "
    "log in once your account is approved."
)


@post("/login", summary="Log in to the portal (form)", status_code=200)
async def login_form(request: Request[Any, Any, Any]) -> Template | Redirect:
    return await _sign_in(request, "login")


@post("/signup", summary="Create a portal account and log in to it (form)", status_code=200)
async def signup_form(request: Request[Any, Any, Any]) -> Template | Redirect:
    return await _sign_in(request, "signup")


@post("/logout", summary="Log out of the portal (form)", status_code=200)
async def logout(request: Request[Any, Any, Any]) -> Redirect:
    """End the session everywhere (a copy of its cookie stops working too) and drop the cookie."""
    await page_user(request)
    # Logging out needs no CSRF check to be safe, but a cross-site page must not sign people out.
    if not csrf_ok(request, await _form(request)):
        return Redirect("/portal", status_code=303)
    session = signed_in(request)
    if session is not None:
        await end_session(_pool(request), session)
    return Redirect(LOGIN, status_code=303, cookies=ended_sessions(request))


# --- the consumer's pages -----------------------------------------------------------------------


@get("/", summary="The developer portal: keys, credits, usage and recent requests")
async def home(request: Request[Any, Any, Any]) -> Template | Redirect:
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN)
    pool = _pool(request)
    first, last, days = _days(datetime.now(UTC).date())
    usage = await usage_by_day(pool, user.id, first, last)
    async with pool.db_sessions() as session:
        keys = await users.list_credentials(session, ApiKey, user.id)
    return _page(
        request,
        "portal/home.html",
        "portal",
        email=user.email,
        credits=await credit_figures(pool, user.id),
        keys=keys,
        usage=list(reversed(usage.data)),
        by_kind=usage.byKind,
        chart=_per_day("Spend", days, [(row.date, row.model, row.costNano) for row in usage.data]),
        recent=await recent_requests(pool, user.id),
        model=next((m.slug for m in model_list(pool).data), "smollm2-135m"),
        done=request.query_params.get("done"),
        headers={"content-security-policy": csp(pool.payments.page_origins)},
        payments=pool.payments.enabled,
        presets=pool.settings.topup_presets,
        topup_min=pool.settings.topup_min,
        topup_max=pool.settings.topup_max,
        topup=request.query_params.get("topup"),
    )


@get("/provider", summary="The provider view: agent tokens, connected agents, trust and earnings")
async def provider(request: Request[Any, Any, Any]) -> Template | Redirect:
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN)
    return await _provider_page(request, user)


async def _provider_page(
    request: Request[Any, Any, Any], user: User, profile_error: str | None = None, status: int = 200
) -> Template:
    pool = _pool(request)
    first, last, days = _days(datetime.now(UTC).date())
    earnings = await earnings_by_day(pool, user.id, first, last)
    return _page(
        request,
        "portal/provider.html",
        "provider",
        email=user.email,
        standing=await provider_standing(pool, user.id),
        earnings=earnings,
        rows=list(reversed(earnings.data)),
        chart=_per_day("Earnings", days, [(row.date, row.model, row.earnedNano) for row in earnings.data]),
        done=request.query_params.get("done"),
        headers={"content-security-policy": csp(pool.payments.page_origins)},
        payments=pool.payments.enabled,
        payouts=await payout_figures(pool, user.id),
        connected=request.query_params.get("payouts") == "connected",
        profile=pool.providers.get(user.id),
        profile_error=profile_error,
        status=status,
    )


@post("/profile", summary="Save your public provider profile (form)", status_code=200)
async def save_profile(request: Request[Any, Any, Any]) -> Template | Redirect:
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN, status_code=303)
    form = await _form(request)
    if not csrf_ok(request, form):
        return Redirect("/portal/provider?done=expired", status_code=303)
    try:
        await profiles.update_profile(
            _pool(request),
            user.id,
            slug=form.get("slug", ""),
            name=form.get("name", ""),
            website=form.get("website") or None,
            description=form.get("description") or None,
            clear=frozenset(f for f in ("website", "description") if not form.get(f, "").strip()),
        )
    except profiles.NotAProvider as exc:
        return await _provider_page(request, user, str(exc), 409)
    except ProfileError as exc:
        return await _provider_page(request, user, str(exc), 409 if exc.taken else 400)
    return Redirect("/portal/provider?done=profile", status_code=303)


# --- keys and agent tokens ----------------------------------------------------------------------


def _kind(path: str) -> Kind:
    kind = KINDS.get(path)
    if kind is None:
        raise PoolError(404, errors.NOT_FOUND, "No such page.")
    return kind


@post("/{kind:str}", summary="Create an API key or agent token (form); the secret is shown once", status_code=200)
async def create(request: Request[Any, Any, Any], kind: str) -> Template | Redirect:
    what = _kind(kind)
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN, status_code=303)
    form = await _form(request)
    if not csrf_ok(request, form):
        return Redirect(f"{what.home}?done=expired", status_code=303)
    try:
        name = msgspec.convert(form.get("name", "").strip(), DisplayName)
    except msgspec.ValidationError:
        return Redirect(f"{what.home}?done=bad-name", status_code=303)
    try:
        async with _pool(request).db_sessions() as session, session.begin():
            row, secret = await users.create_credential(session, what.model, user.id, name)
    except users.LimitReached:
        return Redirect(f"{what.home}?done=limit", status_code=303)
    return _page(request, "portal/secret.html", what.page, email=user.email, kind=what, row=row, secret=secret)


@get("/{kind:str}/{credential_id:int}/revoke", summary="Confirm revoking an API key or agent token")
async def confirm_revoke(
    request: Request[Any, Any, Any], kind: str, credential_id: CredentialId
) -> Template | Redirect:
    what = _kind(kind)
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN)
    async with _pool(request).db_sessions() as session:
        mine = {row.id: row for row in await users.list_credentials(session, what.model, user.id)}
    row = mine.get(credential_id)
    if row is None:
        return _page(request, "portal/missing.html", what.page, status=404, email=user.email, kind=what)
    return _page(request, "portal/revoke.html", what.page, email=user.email, kind=what, row=row)


@post("/{kind:str}/{credential_id:int}/revoke", summary="Revoke an API key or agent token (form)", status_code=200)
async def revoke(request: Request[Any, Any, Any], kind: str, credential_id: CredentialId) -> Template | Redirect:
    what = _kind(kind)
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN, status_code=303)
    if not csrf_ok(request, await _form(request)):
        return Redirect(f"{what.home}?done=expired", status_code=303)
    revoked = await revocation.revoke(_pool(request), what.model, user.id, credential_id)
    if not revoked:
        return _page(request, "portal/missing.html", what.page, status=404, email=user.email, kind=what)
    return Redirect(f"{what.home}?done=revoked", status_code=303)


# --- key policies and the list of requests ---------------------------------------------------------

DETECTOR_TEXTS = (
    (dlp.SECRET, "an API key, token, private key or password"),
    (dlp.CARD, "a payment card number"),
    (dlp.IBAN, "an IBAN"),
    (dlp.EMAIL, "an e-mail address"),
    (dlp.PHONE, "a phone number"),
)


async def _own_key(request: Request[Any, Any, Any], user: User, key_id: int) -> ApiKey | None:
    async with _pool(request).db_sessions() as session:
        key = await session.get(ApiKey, key_id)
    return key if key is not None and key.user_id == user.id and key.revoked_at is None else None


async def _policy_page(
    request: Request[Any, Any, Any], user: User, row: ApiKey, policy: KeyPolicy, error: str = "", status: int = 200
) -> Template:
    spent_day, spent_month = await key_spend(_pool(request), user.id, row.id)
    return _page(
        request,
        "portal/policy.html",
        "portal",
        status=status,
        email=user.email,
        row=row,
        policy=policy,
        detectors=DETECTOR_TEXTS,
        spent_day=spent_day,
        spent_month=spent_month,
        error=error,
    )


# (under ``/{kind}``, as revoking is: a static ``/keys/…`` would hide ``POST /{kind}`` for ``keys``)
@get("/{kind:str}/{credential_id:int}/policy", summary="A key's policy (form), and what it spent against its caps")
async def policy_page(request: Request[Any, Any, Any], kind: str, credential_id: CredentialId) -> Template | Redirect:
    if _kind(kind).model is not ApiKey:
        raise PoolError(404, errors.NOT_FOUND, "Only API keys have policies.")
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN)
    row = await _own_key(request, user, credential_id)
    if row is None:
        return _page(request, "portal/missing.html", "portal", status=404, email=user.email, kind=KINDS["keys"])
    return await _policy_page(request, user, row, policies.decode(row.policy) or KeyPolicy())


def _number(form: dict[str, str], name: str) -> float | None:
    value = form.get(name, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise PolicyError(f"{name.replace('_', ' ')}: a number") from None


def _policy_of(form: dict[str, str]) -> KeyPolicy:
    """The policy a submitted form describes; :class:`PolicyError` naming what is wrong."""
    models = [m.strip() for m in form.get("models", "").split(",") if m.strip()]
    prompt, completion = _number(form, "price_prompt"), _number(form, "price_completion")
    day, month = _number(form, "cap_day"), _number(form, "cap_month")
    privacy = form.get("privacy", policies.ANY)
    if privacy not in (policies.ANY, policies.TRUSTED, policies.PLATFORM):
        raise PolicyError("privacy: any, trusted or platform")
    actions = {name: form.get(f"dlp_{name}", "") for name in dlp.DETECTORS}
    if any(action not in ("", *dlp.ACTIONS) for action in actions.values()):
        raise PolicyError("data protection: nothing, redact, private or block")
    return KeyPolicy(
        paused=form.get("paused") == "1",
        models=models or None,
        max_price=MaxPrice(prompt, completion) if prompt is not None or completion is not None else None,
        privacy=privacy,  # type: ignore[arg-type]
        project=form.get("project", "").strip(),
        spend_cap=SpendCap(day, month) if day is not None or month is not None else None,
        dlp={name: action for name, action in actions.items() if action} or None,  # type: ignore[misc]
    ).check()


@post("/{kind:str}/{credential_id:int}/policy", summary="Save a key's policy (form)", status_code=200)
async def save_policy(request: Request[Any, Any, Any], kind: str, credential_id: CredentialId) -> Template | Redirect:
    if _kind(kind).model is not ApiKey:
        raise PoolError(404, errors.NOT_FOUND, "Only API keys have policies.")
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN, status_code=303)
    form = await _form(request)
    if not csrf_ok(request, form):
        return Redirect("/portal?done=expired", status_code=303)
    row = await _own_key(request, user, credential_id)
    if row is None:
        return _page(request, "portal/missing.html", "portal", status=404, email=user.email, kind=KINDS["keys"])
    try:
        policy = _policy_of(form)
    except PolicyError as exc:
        return await _policy_page(request, user, row, policies.decode(row.policy) or KeyPolicy(), str(exc), 400)
    if not await revocation.set_policy(_pool(request), row.id, policy, user.id):  # revoked meanwhile
        return _page(request, "portal/missing.html", "portal", status=404, email=user.email, kind=KINDS["keys"])
    return Redirect("/portal?done=policy", status_code=303)


async def _requests_page(request: Request[Any, Any, Any], user: User) -> tuple[RequestPage | None, dict[str, str], str]:
    """The page of requests the query asks for, the filters as given, and what is wrong with them."""
    query = request.query_params
    filters = {name: query.get(name, "") for name in ("key", "project", "model", "status", "from", "to")}
    try:
        first, last = day_range(filters["from"] or None, filters["to"] or None)
    except PoolError as exc:
        return None, filters, exc.message
    try:
        key = int(filters["key"]) if filters["key"] else None
        status = int(filters["status"]) if filters["status"] else None
        if (key is not None and not 1 <= key < 2**31) or (status is not None and not 100 <= status <= 599):
            raise ValueError("out of range")
        cursor = query.get("cursor")
        position = cursor_position(cursor) if cursor else None
    except ValueError:
        return None, filters, "Those filters are not valid: key and status are numbers."
    where = RequestFilter.over(first, last, key, filters["project"] or None, filters["model"] or None, status)
    return await list_requests(_pool(request), user.id, where, position, 100), filters, ""


@get("/requests", summary="Your requests, with filters (the audit list)")
async def requests_page(request: Request[Any, Any, Any]) -> Template | Redirect:
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN)
    page, filters, error = await _requests_page(request, user)
    async with _pool(request).db_sessions() as session:
        keys = await users.list_credentials(session, ApiKey, user.id)
    return _page(
        request,
        "portal/requests.html",
        "portal",
        status=400 if error else 200,
        email=user.email,
        listed=page or RequestPage([], None),
        filters=filters,
        keys=keys,
        query=urlencode({k: v for k, v in filters.items() if v}),
        error=error,
    )


@get("/requests.csv", summary="Your requests, with the page's filters, as CSV")
async def requests_csv(request: Request[Any, Any, Any]) -> Response[str] | Redirect:
    user = await _who(request)
    if user is None:
        return Redirect(LOGIN)
    page, _, error = await _requests_page(request, user)
    if page is None:
        raise PoolError(400, errors.INVALID_REQUEST, error)
    headers = {"content-disposition": 'attachment; filename="requests.csv"'}
    return Response(as_csv(page), media_type="text/csv; charset=utf-8", headers=headers)


portal_pages = Router(
    "/portal",
    route_handlers=[
        login_page,
        signup_page,
        save_profile,
        login_form,
        signup_form,
        logout,
        home,
        provider,
        create,
        confirm_revoke,
        revoke,
        policy_page,
        save_policy,
        requests_page,
        requests_csv,
    ],
    response_headers=page_headers("no-store"),
    tags=["pages"],
)
