"""Portal identity and credentials: signup, login, logout, and the user's own keys and agent tokens.

Anyone can sign up, so signup tells nobody whether an email already has an account: it answers the
same (202, same body, an argon2 hash either way) and hands out no session; the client then logs in,
which for a taken email fails like any wrong password. Signups are limited per client address before
anything is hashed (``POOL_SIGNUPS_PER_HOUR``), and with ``POOL_SIGNUP_APPROVAL`` a new account cannot
log in until an operator approves it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.params import Parameter
from msgspec import Meta
from sqlalchemy import select

from coordinator import accounts
from coordinator.errors import PoolError
from coordinator.guards import PortalSession, check_not_blocked, client_address, require_session
from coordinator.models import AgentToken, ApiKey, User
from coordinator.state import PoolState
from shared import errors

Email = Annotated[str, Meta(min_length=3, max_length=320)]
Password = Annotated[str, Meta(min_length=8, max_length=1024)]
DisplayName = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]


class Credentials(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: Password


class UserOut(msgspec.Struct):
    id: int
    email: str


class SessionOut(msgspec.Struct):
    token: str
    tokenType: str
    expiresIn: int
    user: UserOut


class SignupOut(msgspec.Struct):
    email: str
    approvalRequired: bool
    message: str


class TokenCreate(msgspec.Struct, forbid_unknown_fields=True):
    displayName: DisplayName


class TokenOut(msgspec.Struct):
    id: int
    displayName: str
    prefix: str
    createdAt: datetime
    lastUsedAt: datetime | None


class TokenCreated(msgspec.Struct):
    id: int
    displayName: str
    prefix: str
    createdAt: datetime
    token: str


class TokenList(msgspec.Struct):
    data: list[TokenOut]


def _pool(request: Request[Any, Any, Any]) -> PoolState:
    pool: PoolState = request.app.state.pool
    return pool


def _session(pool: PoolState, user: User) -> SessionOut:
    return SessionOut(
        token=pool.portal.issue(str(user.id)),
        tokenType="Bearer",
        expiresIn=pool.portal.ttl,
        user=UserOut(user.id, user.email),
    )


def _local_only(pool: PoolState) -> None:
    if pool.portal.external:
        raise PoolError(403, errors.POLICY_BLOCKED, "Accounts are managed by this pool's identity provider.")


@post(
    "/v1/auth/signup",
    summary="Create an account (then log in)",
    description="Answers 202 with the same body whether or not the email already has an account, and returns no "
    "session: log in with `POST /v1/auth/login`. Limited per client address (429 with Retry-After).",
    tags=["portal"],
    status_code=202,
)
async def signup(request: Request[Any, Any, Any], data: Credentials) -> SignupOut:
    pool = _pool(request)
    email = await register(pool, data, client_address(request))
    approval = pool.settings.signup_approval
    message = "If this email had no account, one was created. Log in with POST /v1/auth/login."
    if approval:
        message += " New accounts can log in once an operator has approved them."
    return SignupOut(email, approval, message)


@post("/v1/auth/login", summary="Start a portal session", tags=["portal"], status_code=200)
async def login(request: Request[Any, Any, Any], data: Credentials) -> SessionOut:
    pool = _pool(request)
    return _session(pool, await authenticate(pool, data, client_address(request)))


@post(
    "/v1/auth/logout",
    guards=[require_session],
    summary="End this portal session",
    description="The bearer session is refused from now on, by every coordinator process.",
    tags=["portal"],
    status_code=204,
)
async def logout(request: Request[Any, Any, Any]) -> Response[None]:
    portal: PortalSession = request.state.portal_session
    await end_session(_pool(request), portal)
    return Response(None, status_code=204)


async def end_session(pool: PoolState, portal: PortalSession) -> None:
    """Revoke a session until it expires (one without a ``jti`` can only expire)."""
    if portal.jti is None:
        return
    expires = datetime.fromtimestamp(min(portal.expires, time.time() + MAX_REVOCATION), UTC)
    async with pool.sessions() as session, session.begin():
        await accounts.revoke_session(session, portal.jti, expires)


MAX_REVOCATION = 366 * 86_400.0  # an identity provider's far-off ``exp`` is kept this long at most


async def register(pool: PoolState, data: Credentials, client: str) -> str:
    """Create the account unless the email has one, and say neither way; returns the normalized email.

    :class:`PoolError` 400 for an invalid email, 429 past the signup limit of ``client``'s address
    (checked before the costly hash), 403 under an identity provider."""
    _local_only(pool)
    try:
        email = accounts.normalize_email(data.email)
    except accounts.AccountError as exc:
        raise PoolError(400, errors.INVALID_REQUEST, str(exc), param="email") from None
    wait = pool.signups.take(client)
    if wait:
        raise PoolError(
            429,
            errors.RATE_LIMIT_EXCEEDED,
            f"Too many signups from this address. Retry in {wait} s.",
            headers={"retry-after": str(wait)},
        )
    password_hash = await pool.passwords.hash(data.password)  # for a taken email too: the same time
    try:
        async with pool.sessions() as session, session.begin():
            await accounts.create_user(
                session, email, password_hash=password_hash, approved=not pool.settings.signup_approval
            )
    except accounts.AccountError:
        pass  # the email has an account: its owner's password still opens it, this one does not
    return email


async def authenticate(pool: PoolState, data: Credentials, client: str) -> User:
    """The account these credentials open; :class:`PoolError` 401 (counted against ``client``), or
    403 for a correct password of an account that waits for an operator's approval."""
    _local_only(pool)
    check_not_blocked(pool, client)
    try:
        email = accounts.normalize_email(data.email)
    except accounts.AccountError:
        email = ""
    async with pool.sessions() as session:
        user = await session.scalar(select(User).where(User.email == email)) if email else None
    if not await pool.passwords.verify(user.password_hash if user else None, data.password) or user is None:
        pool.auth_failures.failed(client)
        raise PoolError(401, errors.INVALID_CREDENTIALS, "Wrong email or password.")
    if not user.approved:
        raise PoolError(
            403, errors.POLICY_BLOCKED, "This account is waiting for an operator's approval; try again once approved."
        )
    return user


def _credential_router(path: str, model: type[ApiKey] | type[AgentToken], what: str) -> Router:
    """List, create and revoke one kind of credential; a user only ever sees their own."""

    @post("/", summary=f"Create {what}; the secret is returned once", status_code=201, operation_id=f"create_{path}")
    async def create(request: Request[Any, Any, Any], data: TokenCreate) -> TokenCreated:
        pool = _pool(request)
        try:
            async with pool.sessions() as session, session.begin():
                row, secret = await accounts.create_credential(session, model, request.state.user_id, data.displayName)
        except accounts.LimitReached as exc:
            raise PoolError(409, errors.CONFLICT, str(exc)) from None
        return TokenCreated(row.id, row.name, row.prefix + "…", row.created_at, secret)

    @get("/", summary=f"List your {what}s (never their secrets)", operation_id=f"list_{path}")
    async def list_(request: Request[Any, Any, Any]) -> TokenList:
        pool = _pool(request)
        async with pool.sessions() as session:
            rows = await accounts.list_credentials(session, model, request.state.user_id)
        return TokenList([TokenOut(r.id, r.name, r.prefix + "…", r.created_at, r.last_used_at) for r in rows])

    @delete(
        "/{credential_id:int}",
        summary=f"Revoke one of your {what}s (refused everywhere within 1 s)",
        status_code=204,
        operation_id=f"revoke_{path}",
    )
    async def revoke(
        request: Request[Any, Any, Any], credential_id: Annotated[int, Parameter(ge=1, le=2**31 - 1)]
    ) -> Response[None]:
        pool = _pool(request)
        async with pool.sessions() as session, session.begin():
            revoked = await accounts.revoke_credential(session, model, request.state.user_id, credential_id)
        if not revoked:
            raise PoolError(404, errors.NOT_FOUND, f"No such {what}.", param="id")
        return Response(None, status_code=204)

    return Router(f"/v1/{path}", route_handlers=[create, list_, revoke], guards=[require_session], tags=["portal"])


tokens_router = _credential_router("tokens", ApiKey, "consumer key")
agent_tokens_router = _credential_router("agent-tokens", AgentToken, "agent token")
