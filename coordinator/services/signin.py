"""Accounts through the portal: signup (no enumeration, limited per address, optionally approved
by an operator), login, the portal session a token opens, and logout. The JSON API, the portal
pages and the guards call these."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import Meta
from sqlalchemy import select

from coordinator.core.errors import PoolError, too_many
from coordinator.core.models import User
from coordinator.identity import keys, users
from coordinator.identity.portal_tokens import InvalidSession
from coordinator.services.state import PoolState
from shared import errors

log = logging.getLogger(__name__)

Email = Annotated[str, Meta(min_length=3, max_length=320)]


Password = Annotated[str, Meta(min_length=8, max_length=1024)]


DisplayName = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]


def check_not_blocked(pool: PoolState, client: str) -> None:
    wait = pool.auth_failures.blocked(client)
    if wait:
        raise too_many("failed authentications", wait)


@dataclass(frozen=True, slots=True)
class PortalSession:
    """A valid portal session: whose it is, and what names it (its ``jti``, else the token itself)."""

    user_id: int
    jti: str | None
    expires: float  # the token's ``exp``
    token: str


async def portal_session(pool: PoolState, token: str) -> PortalSession | None:
    """The portal session a token opens; ``None`` if it is invalid, logged out, or its user may not
    log in (unknown, or waiting for approval)."""
    if not token or token.startswith((keys.CONSUMER_PREFIX, keys.AGENT_PREFIX)):
        return None
    try:
        claims = await pool.portal.verify(token)
    except InvalidSession as exc:
        log.info("portal session refused", extra={"reason": str(exc)})
        return None
    subject = str(claims["sub"])
    jti = claims.get("jti")
    jti = jti if isinstance(jti, str) and jti else None
    expires = float(claims["exp"])
    if pool.portal.external:
        async with pool.db_sessions() as session, session.begin():
            email = claims.get("email")
            user = await users.user_for_subject(session, subject, email if isinstance(email, str) else None)
            if jti is not None and await session.scalar(select(users.session_revoked(jti))):
                return None
            return PortalSession(user.id, jti, expires, token)
    if not subject.isdigit() or len(subject) > 18:
        return None
    # One query, as before revocation existed: the user exists, may log in, and this session was not
    # logged out (on any process: the row is there the moment logout answers).
    query = select(User.id).where(User.id == int(subject), User.approved.is_(True))
    if jti is not None:
        query = query.where(~users.session_revoked(jti))
    async with pool.db_sessions() as session:
        exists = await session.scalar(query)
    return PortalSession(int(subject), jti, expires, token) if exists is not None else None


class Credentials(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: Password


def _local_only(pool: PoolState) -> None:
    if pool.portal.external:
        raise PoolError(403, errors.POLICY_BLOCKED, "Accounts are managed by this pool's identity provider.")


async def end_session(pool: PoolState, portal: PortalSession) -> None:
    """Revoke a session until it expires (one without a ``jti`` can only expire)."""
    if portal.jti is None:
        return
    expires = datetime.fromtimestamp(min(portal.expires, time.time() + MAX_REVOCATION), UTC)
    async with pool.db_sessions() as session, session.begin():
        await users.revoke_session(session, portal.jti, expires)


MAX_REVOCATION = 366 * 86_400.0  # an identity provider's far-off ``exp`` is kept this long at most


async def register(pool: PoolState, data: Credentials, client: str) -> str:
    """Create the account unless the email has one, and say neither way; returns the normalized email.

    :class:`PoolError` 400 for an invalid email, 429 past the signup limit of ``client``'s address
    (checked before the costly hash), 403 under an identity provider."""
    _local_only(pool)
    try:
        email = users.normalize_email(data.email)
    except users.AccountError as exc:
        raise PoolError(400, errors.INVALID_REQUEST, str(exc), param="email") from None
    wait = pool.signups.take(client)
    if wait:
        raise too_many("signups", wait)
    password_hash = await pool.passwords.hash(data.password)  # for a taken email too: the same time
    try:
        async with pool.db_sessions() as session, session.begin():
            await users.create_user(
                session, email, password_hash=password_hash, approved=not pool.settings.signup_approval
            )
    except users.AccountError:
        pass  # the email has an account: its owner's password still opens it, this one does not
    return email


async def authenticate(pool: PoolState, data: Credentials, client: str) -> User:
    """The account these credentials open; :class:`PoolError` 401 (counted against ``client``), or
    403 for a correct password of an account that waits for an operator's approval."""
    _local_only(pool)
    check_not_blocked(pool, client)
    try:
        email = users.normalize_email(data.email)
    except users.AccountError:
        email = ""
    async with pool.db_sessions() as session:
        user = await session.scalar(select(User).where(User.email == email)) if email else None
    if not await pool.passwords.verify(user.password_hash if user else None, data.password) or user is None:
        pool.auth_failures.failed(client)
        raise PoolError(401, errors.INVALID_CREDENTIALS, "Wrong email or password.")
    if not user.approved:
        raise PoolError(
            403, errors.POLICY_BLOCKED, "This account is waiting for an operator's approval; try again once approved."
        )
    return user
