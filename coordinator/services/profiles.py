"""A provider's public profile: made at its first agent's hello, changed by its owner; each
process's :class:`~coordinator.identity.providers.ProviderBook` learns a change at once here and
within ``POOL_PROVIDER_REFRESH_SECONDS`` elsewhere."""

from __future__ import annotations

from sqlalchemy import func, select

from coordinator.core.models import AgentToken
from coordinator.identity import providers
from coordinator.identity.providers import Profile
from coordinator.services.state import PoolState


async def ensure_profile(pool: PoolState, user_id: int) -> Profile:
    """The provider's profile, made with the defaults the first time (no query once known)."""
    known = pool.providers.get(user_id)
    if known is not None:
        return known
    async with pool.db_sessions() as session, session.begin():
        profile = await providers.ensure(session, user_id)
    pool.providers.put(profile)
    return profile


class NotAProvider(Exception):
    """Only a provider (an account with an agent token) has a public profile."""


def profile_or_default(pool: PoolState, user_id: int) -> Profile:
    """The provider's profile, or what it would be (nothing is made before its first agent)."""
    return pool.providers.get(user_id) or providers.default_profile(user_id)


async def update_profile(
    pool: PoolState,
    user_id: int,
    *,
    slug: str | None,
    name: str | None,
    website: str | None,
    description: str | None,
    clear: frozenset[str] = frozenset(),
) -> Profile:
    """Change the provider's profile (:class:`~coordinator.identity.providers.ProfileError` if it
    can't be, :class:`NotAProvider` for an account without an agent token); its old slug keeps
    naming it."""
    async with pool.db_sessions() as session, session.begin():
        tokens = await session.scalar(select(func.count()).where(AgentToken.user_id == user_id))
        if not tokens:
            raise NotAProvider("Only providers have a public profile: create an agent token first.")
        profile = await providers.update_profile(
            session, user_id, slug=slug, name=name, website=website, description=description, clear=clear
        )
    old = pool.providers.get(user_id)
    pool.providers.put(profile)
    if old is not None:
        pool.providers.by_slug[old.slug] = user_id
    return profile
