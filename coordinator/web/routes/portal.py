"""Portal identity and credentials: signup, login, logout, and the user's own keys and agent tokens.

Anyone can sign up, so signup tells nobody whether an email already has an account: it answers the
same (202, same body, an argon2 hash either way) and hands out no session; the client then logs in,
which for a taken email fails like any wrong password. Signups are limited per client address before
anything is hashed (``POOL_SIGNUPS_PER_HOUR``), and with ``POOL_SIGNUP_APPROVAL`` a new account cannot
log in until an operator approves it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.params import Parameter

from coordinator.core.errors import PoolError
from coordinator.core.models import AgentToken, ApiKey, User
from coordinator.identity import users
from coordinator.services import revocation
from coordinator.services.signin import Credentials, DisplayName, PortalSession, authenticate, end_session, register
from coordinator.services.state import PoolState, pool_of
from coordinator.web.guards import client_address, require_session
from shared import errors


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
    return pool_of(request)


def _session(pool: PoolState, user: User) -> SessionOut:
    return SessionOut(
        token=pool.portal.issue(str(user.id)),
        tokenType="Bearer",
        expiresIn=pool.portal.ttl,
        user=UserOut(user.id, user.email),
    )


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


def _credential_router(path: str, model: type[ApiKey] | type[AgentToken], what: str) -> Router:
    """List, create and revoke one kind of credential; a user only ever sees their own."""

    @post("/", summary=f"Create {what}; the secret is returned once", status_code=201, operation_id=f"create_{path}")
    async def create(request: Request[Any, Any, Any], data: TokenCreate) -> TokenCreated:
        pool = _pool(request)
        try:
            async with pool.db_sessions() as session, session.begin():
                row, secret = await users.create_credential(session, model, request.state.user_id, data.displayName)
        except users.LimitReached as exc:
            raise PoolError(409, errors.CONFLICT, str(exc)) from None
        return TokenCreated(row.id, row.name, row.prefix + "…", row.created_at, secret)

    @get("/", summary=f"List your {what}s (never their secrets)", operation_id=f"list_{path}")
    async def list_(request: Request[Any, Any, Any]) -> TokenList:
        pool = _pool(request)
        async with pool.db_sessions() as session:
            rows = await users.list_credentials(session, model, request.state.user_id)
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
        revoked = await revocation.revoke(_pool(request), model, request.state.user_id, credential_id)
        if not revoked:
            raise PoolError(404, errors.NOT_FOUND, f"No such {what}.", param="id")
        return Response(None, status_code=204)

    return Router(f"/v1/{path}", route_handlers=[create, list_, revoke], guards=[require_session], tags=["portal"])


tokens_router = _credential_router("tokens", ApiKey, "consumer key")
agent_tokens_router = _credential_router("agent-tokens", AgentToken, "agent token")
