"""Users, consumer keys and agent tokens: creation, listing, revocation and lookup (auth)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.core.models import AgentToken, ApiKey, RevokedSession, User
from coordinator.identity import keys, policies
from coordinator.identity.policies import KeyPolicy
from coordinator.money import ledger

MAX_CREDENTIALS_PER_USER = 100
Credential = type[ApiKey] | type[AgentToken]


class AccountError(Exception):
    """An account operation that cannot be done as asked (unknown user, duplicate email)."""


class LimitReached(AccountError):
    """The user already has as many live keys or tokens as allowed."""


@dataclass(frozen=True)
class Principal:
    """Who a valid secret belongs to, with the key's own rate limits (``None``: the defaults) and
    policy (``None``: everything allowed)."""

    user_id: int
    credential_id: int
    rpm: int | None = None
    tpm: int | None = None
    policy: KeyPolicy | None = None


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    local, _, domain = email.partition("@")
    if not local or "." not in domain or " " in email or len(email) > 320 or domain.startswith("."):
        raise AccountError(f"not an email address: {email!r}")
    return email


async def create_user(
    session: AsyncSession,
    email: str,
    password_hash: str | None = None,
    subject: str | None = None,
    approved: bool = True,
) -> User:
    """A new user with empty wallet, holds and earnings accounts (``approved=False``: one that waits
    for an operator before it can log in)."""
    user = User(email=normalize_email(email), password_hash=password_hash, subject=subject, approved=approved)
    session.add(user)
    try:
        await session.flush()
    except IntegrityError:
        raise AccountError(f"a user with email {user.email} already exists") from None
    await ledger.open_accounts(await session.connection(), user.id)
    return user


async def user_by_email(session: AsyncSession, email: str) -> User:
    user = await session.scalar(select(User).where(User.email == normalize_email(email)))
    if user is None:
        raise AccountError(f"no user with email {email}")
    return user


async def approve_user(session: AsyncSession, email: str) -> User:
    """Let a user who signed up while approval was required log in."""
    user = await user_by_email(session, email)
    user.approved = True
    return user


async def pending_users(session: AsyncSession) -> list[User]:
    """Users waiting for approval, oldest first."""
    return list(await session.scalars(select(User).where(User.approved.is_(False)).order_by(User.id)))


async def user_for_subject(session: AsyncSession, subject: str, email: str | None) -> User:
    """The user an external identity provider's ``sub`` names, created on first sight."""
    user = await session.scalar(select(User).where(User.subject == subject))
    if user is not None:
        return user
    try:
        address = normalize_email(email) if email else None
    except AccountError:
        address = None
    async with session.begin_nested():
        return await create_user(session, address or f"{keys.digest(subject)[:24]}@sso.invalid", subject=subject)


async def create_credential(
    session: AsyncSession, model: Credential, user_id: int, name: str = ""
) -> tuple[ApiKey | AgentToken, str]:
    """Create a consumer key or agent token for the user; returns it and the secret (shown once)."""
    live = await session.scalar(
        select(model.id)
        .where(model.user_id == user_id, model.revoked_at.is_(None))
        .offset(MAX_CREDENTIALS_PER_USER - 1)
    )
    if live is not None:
        raise LimitReached(f"at most {MAX_CREDENTIALS_PER_USER} live credentials per user; revoke one first")
    secret = keys.generate(keys.CONSUMER_PREFIX if model is ApiKey else keys.AGENT_PREFIX)
    row = model(user_id=user_id, name=name, prefix=keys.display_prefix(secret), digest=keys.digest(secret))
    session.add(row)
    await session.flush()
    return row, secret


async def create_api_key(session: AsyncSession, email: str, name: str = "") -> str:
    """Create a consumer key for the user with ``email``; returns the secret (shown once)."""
    user = await user_by_email(session, email)
    return (await create_credential(session, ApiKey, user.id, name))[1]


async def create_agent_token(session: AsyncSession, email: str, name: str = "") -> str:
    """Create an agent token for the provider with ``email``; returns the secret (shown once)."""
    user = await user_by_email(session, email)
    return (await create_credential(session, AgentToken, user.id, name))[1]


async def list_credentials(session: AsyncSession, model: Credential, user_id: int) -> list[ApiKey] | list[AgentToken]:
    """The user's live keys or tokens, newest first."""
    rows = await session.scalars(
        select(model).where(model.user_id == user_id, model.revoked_at.is_(None)).order_by(model.id.desc())
    )
    return list(rows)  # type: ignore[return-value]


async def revoke_credential(session: AsyncSession, model: Credential, user_id: int, credential_id: int) -> bool:
    """Revoke one of the user's own keys or tokens; ``False`` if it is not theirs or already revoked."""
    result = await session.execute(
        update(model)
        .where(model.id == credential_id, model.user_id == user_id, model.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def set_key_limits(session: AsyncSession, key_id: int, rpm: int | None, tpm: int | None) -> None:
    result = await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(rpm_limit=rpm, tpm_limit=tpm))
    if not result.rowcount:  # type: ignore[attr-defined]
        raise AccountError(f"no key with id {key_id}")


async def find_api_key(session: AsyncSession, secret_digest: str) -> Principal | None:
    row = (
        await session.execute(
            select(ApiKey.user_id, ApiKey.id, ApiKey.rpm_limit, ApiKey.tpm_limit, ApiKey.policy).where(
                ApiKey.digest == secret_digest, ApiKey.revoked_at.is_(None)
            )
        )
    ).first()
    return Principal(row[0], row[1], row[2], row[3], policies.decode(row[4])) if row else None


async def key_policy(session: AsyncSession, key_id: int, user_id: int | None = None) -> KeyPolicy | None:
    """A live key's policy (``KeyPolicy()`` if it has none); ``None`` if there is no such key
    (of ``user_id``'s, when given)."""
    query = select(ApiKey.policy).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    if user_id is not None:
        query = query.where(ApiKey.user_id == user_id)
    row = (await session.execute(query)).first()
    return None if row is None else policies.decode(row[0]) or KeyPolicy()


async def set_key_policy(session: AsyncSession, key_id: int, policy: KeyPolicy, user_id: int | None = None) -> bool:
    """Replace a live key's policy; ``False`` if there is no such key (of ``user_id``'s, when given)."""
    query = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    if user_id is not None:
        query = query.where(ApiKey.user_id == user_id)
    result = await session.execute(query.values(policy=policies.encode(policy.check())))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def find_agent_token(session: AsyncSession, secret_digest: str) -> Principal | None:
    row = (
        await session.execute(
            select(AgentToken.user_id, AgentToken.id).where(
                AgentToken.digest == secret_digest, AgentToken.revoked_at.is_(None)
            )
        )
    ).first()
    return Principal(row[0], row[1]) if row else None


async def revoked_agent_tokens(session: AsyncSession, token_ids: set[int]) -> set[int]:
    """Which of ``token_ids`` are revoked (or gone)."""
    if not token_ids:
        return set()
    live = await session.scalars(
        select(AgentToken.id).where(AgentToken.id.in_(token_ids), AgentToken.revoked_at.is_(None))
    )
    return token_ids - set(live)


def jti_digest(jti: str) -> str:
    """How a session's ``jti`` is stored: fixed size, whatever an identity provider puts there."""
    return hashlib.sha256(jti.encode("utf-8", "surrogatepass")).hexdigest()


def session_revoked(jti: str) -> ColumnElement[bool]:
    """A condition true when the session with ``jti`` was logged out."""
    return exists().where(RevokedSession.jti_digest == jti_digest(jti))


async def revoke_session(session: AsyncSession, jti: str, expires_at: datetime) -> None:
    """Refuse the session with ``jti`` from now until it expires; forget sessions that expired."""
    await session.execute(delete(RevokedSession).where(RevokedSession.expires_at < datetime.now(UTC)))
    digest = jti_digest(jti)
    if await session.get(RevokedSession, digest) is None:
        try:
            async with session.begin_nested():
                session.add(RevokedSession(jti_digest=digest, expires_at=expires_at))
        except IntegrityError:  # logged out at the same moment by another request: revoked either way
            pass
