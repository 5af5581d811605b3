"""How the portal's pages know who is asking, and the headers every page carries.

The pages keep the portal JWT (the same one ``/v1/auth/login`` returns) in a cookie, not in memory:
they are rendered on the server with the user's data in the first paint and work without JavaScript,
which a token held by script could not give. The cookie is ``HttpOnly`` (no script, injected or
not, can read it), ``SameSite=Strict`` (no other site's page sends it along), scoped to ``/portal``,
and ``Secure`` behind HTTPS. Forms also carry a token that must equal the ``pool_csrf`` cookie
(double submit), so a cross-site post fails even where SameSite is not honoured.
"""

from __future__ import annotations

import hmac
import re
import secrets
from typing import Any

from litestar import Request
from litestar.datastructures import Cookie, ResponseHeader

from coordinator.guards import PortalSession, portal_session
from coordinator.state import PoolState

SESSION_COOKIE = "pool_session"
CSRF_COOKIE = "pool_csrf"
CSRF_FIELD = "csrf"
PORTAL_PATH = "/portal"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def page_headers(cache: str) -> list[ResponseHeader]:
    """Content Security Policy (scripts and styles from our own files only, nothing inline) and the
    usual hardening, with ``cache`` as Cache-Control."""
    return [
        ResponseHeader(name="content-security-policy", value=CSP),
        ResponseHeader(name="x-content-type-options", value="nosniff"),
        ResponseHeader(name="referrer-policy", value="same-origin"),
        ResponseHeader(name="x-frame-options", value="DENY"),
        ResponseHeader(name="cache-control", value=cache),
    ]


LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def public_url(request: Request[Any, Any, Any]) -> str:
    """The pool's address as users should see it: ``POOL_PUBLIC_URL``, else what the request says
    (behind a proxy, set the former: the Host header is the client's to choose)."""
    pool: PoolState = request.app.state.pool
    return pool.settings.public_url or str(request.base_url).rstrip("/")


def _secure(request: Request[Any, Any, Any]) -> bool:
    """Cookies are ``Secure`` unless the pool is reached over plain HTTP on loopback (or is
    configured with an ``http://`` public URL): a TLS proxy in front may make requests look plain."""
    pool: PoolState = request.app.state.pool
    if pool.settings.public_url is not None:
        return pool.settings.public_url.startswith("https://")
    return request.url.scheme == "https" or (request.url.hostname or "") not in LOOPBACK


def signed_in(request: Request[Any, Any, Any]) -> PortalSession | None:
    """The session :func:`page_user` found for this request."""
    found: PortalSession | None = getattr(request.state, "portal_session", None)
    return found


def csrf_token(request: Request[Any, Any, Any]) -> str:
    """The browser's double-submit token (a new one if it has none)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    return token if _TOKEN.match(token) else secrets.token_urlsafe(24)


def csrf_cookie(request: Request[Any, Any, Any], token: str) -> Cookie:
    return Cookie(
        key=CSRF_COOKIE, value=token, path=PORTAL_PATH, httponly=True, samesite="strict", secure=_secure(request)
    )


def csrf_ok(request: Request[Any, Any, Any], form: dict[str, str]) -> bool:
    """Whether a posted form carries the token of the cookie it came with."""
    cookie, sent = request.cookies.get(CSRF_COOKIE, ""), form.get(CSRF_FIELD, "")
    return bool(_TOKEN.match(cookie)) and hmac.compare_digest(cookie.encode(), sent.encode())


def session_cookie(request: Request[Any, Any, Any], token: str, max_age: int) -> Cookie:
    return Cookie(
        key=SESSION_COOKIE,
        value=token,
        path=PORTAL_PATH,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def ended_session(request: Request[Any, Any, Any]) -> Cookie:
    return Cookie(
        key=SESSION_COOKIE,
        value="",
        path=PORTAL_PATH,
        max_age=0,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


async def page_user(request: Request[Any, Any, Any]) -> int | None:
    """The signed-in user of a page request, ``None`` without a valid session cookie; the session is
    remembered on the request (:func:`signed_in`)."""
    pool: PoolState = request.app.state.pool
    found = await portal_session(pool, request.cookies.get(SESSION_COOKIE, ""))
    request.state.portal_session = found
    return found.user_id if found is not None else None
