"""Portal sessions (DESIGN §6): short-lived JWTs, and passwords hashed with argon2id.

Either the coordinator signs its own tokens (HS256 with ``POOL_JWT_SECRET``) or it verifies tokens an
external identity provider signed, with keys from ``POOL_JWT_JWKS_URL`` (refetched when a token names
a key it has not seen, so key rotation needs no restart). Either way the algorithm is pinned and
``exp``, ``iss``, ``aud`` and ``sub`` are required. The coordinator's own tokens carry a ``jti``, so
logging out revokes that one session (``revoked_sessions``) before it expires; tokens without one
(an identity provider's may lack it) end at their expiry.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]

_hasher = PasswordHasher()  # argon2id with the library's (RFC 9106 "low memory") parameters
_DUMMY_HASH = _hasher.hash("not a password anyone has")


class InvalidSession(Exception):
    """A token that is not a valid portal session."""


class SessionTokens:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        ttl: int,
        secret: str | None = None,
        jwks_url: str | None = None,
        algorithms: Sequence[str] = ("RS256",),
        leeway: float = 0.0,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self.leeway = leeway
        self._secret = secret
        # The key set is cached for 5 minutes and refetched (at most once a second) when a token names
        # a key it lacks, so a new key works at once and a key the provider dropped stops working.
        self._jwks = (
            jwt.PyJWKClient(jwks_url, cache_jwk_set=True, lifespan=300, timeout=5, cooldown_duration=1.0)
            if jwks_url
            else None
        )
        self._algorithms = list(algorithms) if jwks_url else ["HS256"]
        if self._jwks is None and not secret:
            raise ValueError("a JWT secret or a JWKS URL is required")

    @property
    def external(self) -> bool:
        """Whether an external identity provider issues the tokens (no local signup or login)."""
        return self._jwks is not None

    def issue(self, subject: str) -> str:
        """A signed session token for ``subject`` (local mode only)."""
        if self._secret is None:
            raise RuntimeError("sessions are issued by the external identity provider")
        issued = int(time.time())
        claims = {
            "sub": subject,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": issued,
            "exp": issued + self.ttl,
            "jti": secrets.token_urlsafe(16),  # names this session, so logging out can revoke it
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`InvalidSession`."""
        try:
            if self._jwks is not None:
                signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
                key: Any = signing_key.key
            else:
                key = self._secret
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidSession(type(exc).__name__) from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise InvalidSession("sub")
        return claims


class Passwords:
    """argon2id off the event loop, on ``at_once`` threads of its own: each hash or check takes 64 MiB
    and a core, so a flood of signups or logins queues (a few hundred bytes each) instead of growing
    memory, and a caller that gives up does not free a thread still hashing."""

    def __init__(self, at_once: int = 2) -> None:
        self._threads = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="argon2")

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._threads, _hasher.hash, password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches; unknown users are checked against a dummy hash so both cost
        the same."""

        def check() -> bool:
            try:
                return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
            except (VerificationError, InvalidHashError):
                return False

        return await asyncio.get_running_loop().run_in_executor(self._threads, check)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
