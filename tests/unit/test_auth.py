"""The secret cache: a key in use is looked up again ahead of its expiry, a revoked one still expires,
and a lookup that raced a revocation does not bring the old answer back."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from coordinator.identity import keys
from coordinator.identity.auth import SecretCache
from coordinator.identity.users import Principal
from tests.waiting import eventually_async


async def test_a_key_in_use_is_looked_up_ahead_and_still_expires() -> None:
    now = [1000.0]
    answers: list[Principal | None] = [Principal(user_id=1, credential_id=7)]
    lookups: list[str] = []

    async def lookup(_: AsyncSession, secret_digest: str) -> Principal | None:
        lookups.append(secret_digest)
        return answers[-1]

    # No database: the lookup is the test's, the sessions it is handed are never used.
    cache = SecretCache(async_sessionmaker(), keys.CONSUMER_PREFIX, lookup, ttl=1.0, clock=lambda: now[0])
    header = f"Bearer {keys.generate(keys.CONSUMER_PREFIX)}"
    assert await cache.resolve(header) == answers[0]
    assert await cache.resolve(header) == answers[0] and len(lookups) == 1  # cached
    now[0] += 0.6  # past half the TTL: answered from the cache, looked up behind it
    answers.append(None)  # revoked meanwhile
    assert await cache.resolve(header) == answers[0]
    await eventually_async(lambda: len(lookups) == 2)
    assert await cache.resolve(header) is None  # the lookup ahead saw the revocation
    now[0] += 1.1  # unused for a whole TTL: the entry expired, the request waits for a lookup
    answers.append(Principal(user_id=1, credential_id=8))
    assert await cache.resolve(header) == answers[-1] and len(lookups) == 3


async def test_a_lookup_under_way_when_a_key_is_forgotten_caches_nothing() -> None:
    """A refresh that read the key before its revocation (or policy change) was written must not put
    the old answer back after ``forget``: the next request looks the key up again."""
    now = [1000.0]
    answers: list[Principal | None] = [Principal(user_id=1, credential_id=7)]
    reading = asyncio.Event()
    release = asyncio.Event()

    async def lookup(_: AsyncSession, secret_digest: str) -> Principal | None:
        seen = answers[-1]  # what the database held when the read ran
        if len(answers) == 1 and reading.is_set() is False and now[0] > 1000.0:
            reading.set()
            await release.wait()  # the revocation is written and pushed while this read is on its way
        return seen

    cache = SecretCache(async_sessionmaker(), keys.CONSUMER_PREFIX, lookup, ttl=1.0, clock=lambda: now[0])
    header = f"Bearer {keys.generate(keys.CONSUMER_PREFIX)}"
    assert await cache.resolve(header) == answers[0]
    now[0] += 0.6  # a refresh starts behind this answer, and reads the old row
    assert await cache.resolve(header) == answers[0]
    await asyncio.wait_for(reading.wait(), 1)
    answers.append(None)  # revoked
    cache.forget(7)
    release.set()
    await eventually_async(lambda: not cache._refreshing)
    assert await cache.resolve(header) is None  # looked up again, not the stale refresh's answer
