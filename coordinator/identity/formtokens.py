"""The portal forms' CSRF tokens: minted by the server, so a planted cookie and field are worthless.

A form on a signed-in page carries ``HMAC(key, session's jti)``: nobody without the server's key can
make it, and it opens only the session it was rendered for. A login or signup form (no session yet)
carries ``nonce.issued.HMAC(key, nonce|issued)``, also in the ``pool_csrf`` cookie: a pair the server
did not mint, or minted more than ``nonce_ttl`` ago, is refused. The key is derived from
``POOL_JWT_SECRET`` (random per process without it), and the server keeps nothing per form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time

_NONCE_TOKEN = re.compile(r"^([A-Za-z0-9_-]{22})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})$")


class FormTokens:
    """Mints and checks the portal forms' tokens with a key derived from the server's secret."""

    def __init__(self, secret: str, nonce_ttl: float = 6 * 3600) -> None:
        self._key = hmac.new(secret.encode(), b"provider-pool portal form tokens", hashlib.sha256).digest()
        self.nonce_ttl = nonce_ttl

    def _mac(self, message: str) -> str:
        digest = hmac.new(self._key, message.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def for_session(self, jti: str | None, token: str) -> str:
        """The token of every form on the pages of one session, named by its ``jti`` (else by the
        session token itself)."""
        binding = f"jti:{jti}" if jti else "token:" + hashlib.sha256(token.encode()).hexdigest()
        return self._mac(f"session|{binding}")

    def new_nonce(self) -> str:
        """A token for a form shown before login: a nonce, when it was made, and their HMAC."""
        nonce, issued = secrets.token_urlsafe(16), str(int(time.time()))
        return f"{nonce}.{issued}.{self._mac(f'nonce|{nonce}|{issued}')}"

    def nonce_ok(self, token: str) -> bool:
        """Whether this server made ``token`` with :meth:`new_nonce`, less than ``nonce_ttl`` ago."""
        found = _NONCE_TOKEN.match(token)
        if found is None:
            return False
        nonce, issued, mac = found.groups()
        fresh = 0 <= time.time() - int(issued) < self.nonce_ttl
        return fresh and hmac.compare_digest(mac, self._mac(f"nonce|{nonce}|{issued}"))
