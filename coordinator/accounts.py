"""Users, consumer keys and agent tokens: creation (admin CLI) and lookup (auth)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator import keys
from coordinator.models import AgentToken, ApiKey, User


class AccountError(Exception):
    """An account operation that cannot be done as asked (unknown user, duplicate email)."""


@dataclass(frozen=True)
class Principal:
    """Who a valid secret belongs to."""

    user_id: int
    credential_id: int


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    local, _, domain = email.partition("@")
    if not local or "." not in domain or " " in email:
        raise AccountError(f"not an email address: {email!r}")
    return email


async def create_user(session: AsyncSession, email: str) -> User:
    user = User(email=normalize_email(email))
    session.add(user)
    try:
        await session.flush()
    except IntegrityError:
        raise AccountError(f"a user with email {user.email} already exists") from None
    return user


async def _user_by_email(session: AsyncSession, email: str) -> User:
    user = await session.scalar(select(User).where(User.email == normalize_email(email)))
    if user is None:
        raise AccountError(f"no user with email {email}")
    return user


async def create_api_key(session: AsyncSession, email: str, name: str = "") -> str:
    """Create a consumer key for the user; returns the secret (shown once)."""
    user = await _user_by_email(session, email)
    secret = keys.generate(keys.CONSUMER_PREFIX)
    session.add(ApiKey(user_id=user.id, name=name, prefix=keys.display_prefix(secret), digest=keys.digest(secret)))
    await session.flush()
    return secret


async def create_agent_token(session: AsyncSession, email: str, name: str = "") -> str:
    """Create an agent token for the provider; returns the secret (shown once)."""
    user = await _user_by_email(session, email)
    secret = keys.generate(keys.AGENT_PREFIX)
    session.add(AgentToken(user_id=user.id, name=name, prefix=keys.display_prefix(secret), digest=keys.digest(secret)))
    await session.flush()
    return secret


async def find_api_key(session: AsyncSession, secret_digest: str) -> Principal | None:
    row = (
        await session.execute(
            select(ApiKey.user_id, ApiKey.id).where(ApiKey.digest == secret_digest, ApiKey.revoked_at.is_(None))
        )
    ).first()
    return Principal(row[0], row[1]) if row else None


async def find_agent_token(session: AsyncSession, secret_digest: str) -> Principal | None:
    row = (
        await session.execute(
            select(AgentToken.user_id, AgentToken.id).where(
                AgentToken.digest == secret_digest, AgentToken.revoked_at.is_(None)
            )
        )
    ).first()
    return Principal(row[0], row[1]) if row else None
