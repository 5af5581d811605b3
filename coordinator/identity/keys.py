"""Secret formats (DESIGN §6): ``pool_live_…`` consumer keys and ``pool_agent_…`` agent tokens.

A secret is its prefix, 32 random bytes in base62 (43 characters) and a 6-character base62 CRC-32
of those characters, so scanners and the coordinator can tell a real key from noise without a lookup.
Only the SHA-256 digest and a short display prefix are stored.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

CONSUMER_PREFIX = "pool_live_"
AGENT_PREFIX = "pool_agent_"

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 43  # ceil(256 / log2(62))
_CHECK_LEN = 6
_DISPLAY_CHARS = 6


def _base62(value: int, width: int) -> str:
    digits = []
    while value:
        value, rem = divmod(value, 62)
        digits.append(_ALPHABET[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def generate(prefix: str) -> str:
    """A new secret with ``prefix``."""
    body = _base62(int.from_bytes(secrets.token_bytes(32), "big"), _BODY_LEN)
    return prefix + body + _checksum(body)


def is_well_formed(secret: str, prefix: str) -> bool:
    """Whether ``secret`` has the shape and checksum of a secret with ``prefix``."""
    if not secret.startswith(prefix) or len(secret) != len(prefix) + _BODY_LEN + _CHECK_LEN:
        return False
    rest = secret[len(prefix) :]
    if any(ch not in _ALPHABET for ch in rest):
        return False
    body, check = rest[:_BODY_LEN], rest[_BODY_LEN:]
    return secrets.compare_digest(_checksum(body), check)


def digest(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    """What a listing may show of a secret, e.g. ``pool_live_Ab3xYz…``."""
    for prefix in (CONSUMER_PREFIX, AGENT_PREFIX):
        if secret.startswith(prefix):
            return secret[: len(prefix) + _DISPLAY_CHARS]
    return secret[:_DISPLAY_CHARS]
