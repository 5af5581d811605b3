"""Accounts through the portal: signup (no enumeration, limited per address, optionally approved
by an operator), login and logout. The JSON API and the portal pages both call these."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import Meta
from sqlalchemy import select

from coordinator import users
from coordinator.errors import PoolError, too_many
from coordinator.guards import PortalSession, check_not_blocked
from coordinator.models import User
from coordinator.state import PoolState
from shared import errors

Email = Annotated[str, Meta(min_length=3, max_length=320)]


Password = Annotated[str, Meta(min_length=8, max_length=1024)]


DisplayName = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")]


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
