"""Route guards: who may call what (DESIGN §6).

A consumer key (``pool_live_…``) opens the inference API; a portal session (a JWT) opens the
portal's key and token management; the read-only account endpoints accept either; the admin API
wants ``POOL_ADMIN_TOKEN``. A key is never a session and a session is never a key; a session that was
logged out, or whose user waits for an operator's approval, opens nothing. Repeated failures
from one client address are refused with 429 before any lookup.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from coordinator.core.errors import PoolError, invalid_api_key, too_many
from coordinator.identity import keys
from coordinator.money.requestlog import RequestRecord
from coordinator.services.signin import check_not_blocked, portal_session
from coordinator.services.state import PoolState, pool_of
from shared import errors, logs

log = logging.getLogger(__name__)

Connection = ASGIConnection[Any, Any, Any, Any]


def _pool(connection: Connection) -> PoolState:
    return pool_of(connection)


def client_address(connection: Connection) -> str:
    client = connection.client
    return client.host if client is not None else "unknown"


def invalid_session() -> PoolError:
    return PoolError(
        401, errors.INVALID_SESSION, "Invalid or expired session. Log in and send `Authorization: Bearer <token>`."
    )


def _bearer(connection: Connection) -> str:
    scheme, _, value = (connection.headers.get("authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


# The request log's ``kind`` of each inference route: the API a request came through.
API_KINDS = {
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}


async def require_consumer_key(connection: Connection) -> None:
    """A valid ``pool_live_`` key (``Authorization: Bearer …``, or ``x-api-key`` as Anthropic's
    clients send it), checked before the body is read; opens the request's log record.

    The chat route runs it as its ``before_request`` hook rather than as a guard: Litestar copies
    the route handler for every guard call, about 3 % of the route's CPU."""
    pool = _pool(connection)
    client = client_address(connection)
    check_not_blocked(pool, client)
    authorization = connection.headers.get("authorization")
    if not authorization and (api_key := connection.headers.get("x-api-key")):
        authorization = f"Bearer {api_key}"  # how Anthropic's clients send a key
    principal = await pool.consumer_keys.resolve(authorization)
    if principal is None:
        pool.auth_failures.failed(client)
        raise invalid_api_key()
    connection.state.principal = principal
    connection.state.record = RequestRecord(
        id=logs.request_id.get() or "req_unknown",
        user_id=principal.user_id,
        key_id=principal.credential_id,
        kind=API_KINDS.get(connection.url.path, "chat"),
    )


async def _require_user(connection: Connection, *, keys_too: bool) -> None:
    pool = _pool(connection)
    client = client_address(connection)
    check_not_blocked(pool, client)
    token = _bearer(connection)
    user_id: int | None = None
    if keys_too and token.startswith(keys.CONSUMER_PREFIX):
        principal = await pool.consumer_keys.resolve(connection.headers.get("authorization"))
        user_id = principal.user_id if principal is not None else None
    else:
        portal = await portal_session(pool, token)
        connection.state.portal_session = portal
        user_id = portal.user_id if portal is not None else None
    if user_id is None:
        pool.auth_failures.failed(client)
        raise invalid_session()
    connection.state.user_id = user_id


async def require_session(connection: Connection, _: BaseRouteHandler) -> None:
    """A valid portal session (JWT); keys are refused."""
    await _require_user(connection, keys_too=False)


async def require_account(connection: Connection, _: BaseRouteHandler) -> None:
    """A portal session or a consumer key: for reading one's own credits, usage and generations."""
    await _require_user(connection, keys_too=True)


async def require_admin(connection: Connection, _: BaseRouteHandler) -> None:
    """``Authorization: Bearer $POOL_ADMIN_TOKEN``; the admin API is off without one."""
    pool = _pool(connection)
    expected = pool.settings.admin_token
    if not expected:
        raise PoolError(403, errors.POLICY_BLOCKED, "The admin API is disabled (set POOL_ADMIN_TOKEN).")
    client = client_address(connection)
    check_not_blocked(pool, client)
    if not hmac.compare_digest(_bearer(connection).encode(), expected.encode()):
        pool.auth_failures.failed(client)
        raise PoolError(401, errors.INVALID_API_KEY, "Invalid admin token.")


async def limit_public(connection: Connection, _: BaseRouteHandler) -> None:
    """The unauthenticated routes, per client address (``POOL_PUBLIC_RPM``); a request that brings a
    valid consumer key counts against the key instead, at the higher ``POOL_PUBLIC_RPM_KEYED``. A key
    that does not resolve is a failed authentication, as anywhere else (an address that keeps
    trying is blocked before any lookup), and the request counts against the address."""
    pool = _pool(connection)
    client = client_address(connection)
    check_not_blocked(pool, client)
    if _bearer(connection).startswith(keys.CONSUMER_PREFIX):
        principal = await pool.consumer_keys.resolve(connection.headers.get("authorization"))
        if principal is not None:
            wait = pool.public_key_limits.take(f"key:{principal.credential_id}")
            if wait:
                raise PoolError(
                    429,
                    errors.RATE_LIMIT_EXCEEDED,
                    f"Too many requests to the public routes with this key. Retry in {wait} s.",
                    headers={"retry-after": str(wait)},
                )
            return
        pool.auth_failures.failed(client)
    wait = pool.public_limits.take(client)
    if wait:
        raise too_many("requests", wait)
