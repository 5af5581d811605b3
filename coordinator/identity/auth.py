"""Bearer-secret checks with a short in-process cache (revocation visible within ``ttl`` seconds).

Malformed secrets are refused without touching the database; every failure looks the same to the
caller (one 401 body), so responses do not reveal whether a key exists. A secret in use is looked up
again in the background once its entry is half its ``ttl`` old, so a busy key never waits for the
database on a request's path, and the entry still expires ``ttl`` after the lookup that made it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from coordinator.identity import keys, users
from coordinator.identity.users import Principal

log = logging.getLogger(__name__)

Lookup = Callable[[AsyncSession, str], Awaitable[Principal | None]]


class SecretCache:
    """Resolves secrets of one kind (consumer keys or agent tokens) to principals."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        prefix: str,
        lookup: Lookup,
        ttl: float = 1.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._prefix = prefix
        self._lookup = lookup
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._forgets = 0  # forget() calls so far: a lookup that began before one may be stale
        # Lookups under way: requests that miss the cache together for one secret (a burst from a
        # new client) share one database query instead of taking a connection each.
        self._loading: dict[str, asyncio.Future[Principal | None]] = {}

    async def resolve(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization: Bearer …`` header value, or ``None``."""
        if not authorization:
            return None
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not keys.is_well_formed(secret, self._prefix):
            return None
        secret_digest = keys.digest(secret)
        now = self._clock()
        cached = self._entries.get(secret_digest)
        if cached is not None and cached[0] > now:
            if cached[0] - now < self._ttl / 2 and secret_digest not in self._refreshing:
                task = asyncio.create_task(self._refresh(secret_digest))
                self._refreshing[secret_digest] = task
                task.add_done_callback(lambda _: self._refreshing.pop(secret_digest, None))
            return cached[1]
        loading = self._loading.get(secret_digest)
        if loading is None:
            loading = self._loading[secret_digest] = asyncio.ensure_future(self._load(secret_digest))
            loading.add_done_callback(functools.partial(self._loaded, secret_digest))
        return await asyncio.shield(loading)  # one caller cancelled (it went away) cancels nobody else's

    def _loaded(self, secret_digest: str, loading: asyncio.Future[Principal | None]) -> None:
        if self._loading.get(secret_digest) is loading:  # (forget() may have started another since)
            del self._loading[secret_digest]

    async def _load(self, secret_digest: str) -> Principal | None:
        now, forgets = self._clock(), self._forgets
        async with self._sessions() as session:
            principal = await self._lookup(session, secret_digest)
        if forgets != self._forgets:  # revoked or changed while we read: what we read may be old
            return principal
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[secret_digest] = (now + self._ttl, principal)
        return principal

    def forget(self, credential_id: int) -> None:
        """Drop the cached answer for a credential (revoked, or its policy changed): its next use is
        looked up, and no lookup already under way stores what it read before, nor answers a
        request that arrives after this."""
        self._forgets += 1
        self._loading.clear()
        for secret_digest, (_, principal) in list(self._entries.items()):
            if principal is not None and principal.credential_id == credential_id:
                del self._entries[secret_digest]

    async def _refresh(self, secret_digest: str) -> None:
        try:
            await self._load(secret_digest)
        except Exception as exc:  # the entry expires as it would have; the next request looks it up
            log.warning("key refresh failed", extra={"error": str(exc)})


def consumer_keys(sessions: async_sessionmaker[AsyncSession]) -> SecretCache:
    return SecretCache(sessions, keys.CONSUMER_PREFIX, users.find_api_key)


def agent_tokens(sessions: async_sessionmaker[AsyncSession]) -> SecretCache:
    return SecretCache(sessions, keys.AGENT_PREFIX, users.find_agent_token)
