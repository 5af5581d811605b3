"""How the portal's pages know who is asking, and the headers every page carries.

The pages keep the portal JWT (the same one ``/v1/auth/login`` returns) in a cookie, not in memory:
they are rendered on the server with the user's data in the first paint and work without JavaScript,
which a token held by script could not give. The cookie is ``HttpOnly`` (no script, injected or
not, can read it), ``SameSite=Strict`` (no other site's page sends it along), and ``Secure`` behind
HTTPS. Its path is ``/``: the operator console (``/admin``) is signed in with the same session. The
API under ``/v1`` reads only ``Authorization`` headers, never a cookie, so sending it there opens
nothing.

Forms also carry a token the server minted (``coordinator/identity/formtokens.py``): a cross-site post fails
even where SameSite is not honoured, and so does one whose cookies an attacker planted (from a sibling
subdomain or over plain HTTP). A signed-in page's forms are bound to its session; a login or signup
form to a nonce the server signed, kept in the ``pool_csrf`` cookie.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request
from litestar.datastructures import Cookie, ResponseHeader

from coordinator.services.signin import PortalSession, portal_session
from coordinator.services.state import pool_of

SESSION_COOKIE = "pool_session"
CSRF_COOKIE = "pool_csrf"
CSRF_FIELD = "csrf"
COOKIE_PATH = "/"  # the portal (/portal) and the operator console (/admin)
LEGACY_PATH = "/portal"  # where sessions were kept before the console


def csp(form_to: str = "") -> str:
    """The pages' Content Security Policy; ``form_to``: other origins a form may lead to (a form
    whose answer redirects to the payment provider's pages counts as going there)."""
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        f"form-action 'self'{' ' + form_to if form_to else ''}; frame-ancestors 'none'; base-uri 'none'"
    )


CSP = csp()


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
    pool = pool_of(request)
    return pool.settings.public_url or str(request.base_url).rstrip("/")


def _secure(request: Request[Any, Any, Any]) -> bool:
    """Cookies are ``Secure`` unless the pool is reached over plain HTTP on loopback (or is
    configured with an ``http://`` public URL): a TLS proxy in front may make requests look plain."""
    pool = pool_of(request)
    if pool.settings.public_url is not None:
        return pool.settings.public_url.startswith("https://")
    return request.url.scheme == "https" or (request.url.hostname or "") not in LOOPBACK


def signed_in(request: Request[Any, Any, Any]) -> PortalSession | None:
    """The session :func:`page_user` found for this request."""
    found: PortalSession | None = getattr(request.state, "portal_session", None)
    return found


def csrf_token(request: Request[Any, Any, Any]) -> tuple[str, Cookie | None]:
    """The token for the page's forms, and the cookie to set with it (a new pre-login nonce).

    Forms of a page whose handler found a session (:func:`page_user`) are bound to that session;
    other pages' forms (login, signup) to the browser's nonce cookie."""
    pool = pool_of(request)
    session = signed_in(request)
    if session is not None:
        return pool.forms.for_session(session.jti, session.token), None
    token = request.cookies.get(CSRF_COOKIE, "")
    if pool.forms.nonce_ok(token):
        return token, None
    token = pool.forms.new_nonce()
    return token, csrf_cookie(request, token)


def csrf_cookie(request: Request[Any, Any, Any], token: str) -> Cookie:
    return Cookie(
        key=CSRF_COOKIE, value=token, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request)
    )


def csrf_ok(request: Request[Any, Any, Any], form: dict[str, str]) -> bool:
    """Whether a posted form carries a token this server minted for it: bound to the session the
    handler found (:func:`page_user`), or, without one, the nonce of the cookie it came with."""
    pool = pool_of(request)
    sent = form.get(CSRF_FIELD, "")
    session = signed_in(request)
    if session is not None:
        expected = pool.forms.for_session(session.jti, session.token)
        return hmac.compare_digest(sent.encode(errors="replace"), expected.encode())
    cookie = request.cookies.get(CSRF_COOKIE, "")
    return pool.forms.nonce_ok(cookie) and hmac.compare_digest(cookie.encode(), sent.encode(errors="replace"))


def session_cookie(request: Request[Any, Any, Any], token: str, max_age: int) -> Cookie:
    return Cookie(
        key=SESSION_COOKIE,
        value=token,
        path=COOKIE_PATH,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def ended_sessions(request: Request[Any, Any, Any]) -> list[Cookie]:
    """Cookies that end the session: on ``/``, and on ``/portal`` where earlier versions kept it."""
    return [
        Cookie(
            key=SESSION_COOKIE,
            value="",
            path=path,
            max_age=0,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )
        for path in (COOKIE_PATH, LEGACY_PATH)
    ]


async def page_user(request: Request[Any, Any, Any]) -> int | None:
    """The signed-in user of a page request, ``None`` without a valid session cookie; the session is
    remembered on the request, and binds the forms of the page (:func:`csrf_token`, :func:`csrf_ok`)."""
    pool = pool_of(request)
    found = await portal_session(pool, request.cookies.get(SESSION_COOKIE, ""))
    request.state.portal_session = found
    return found.user_id if found is not None else None


def base_context(request: Request[Any, Any, Any], page: str) -> dict[str, Any]:
    """What every page's frame needs."""
    return {"page": page, "base_url": public_url(request), "email": None, "csrf": "", "external": False}
