"""Consumer keys and agent tokens: format, checksum, digest."""

from __future__ import annotations

from coordinator.identity import keys


def test_key_format_and_checksum() -> None:
    secret = keys.generate(keys.CONSUMER_PREFIX)
    assert secret.startswith("pool_live_") and len(secret) == len("pool_live_") + 49
    assert keys.is_well_formed(secret, keys.CONSUMER_PREFIX)
    assert not keys.is_well_formed(secret, keys.AGENT_PREFIX)
    flipped = secret[:-7] + ("A" if secret[-7] != "A" else "B") + secret[-6:]
    assert not keys.is_well_formed(flipped, keys.CONSUMER_PREFIX)
    assert not keys.is_well_formed(secret + "x", keys.CONSUMER_PREFIX)
    assert not keys.is_well_formed(secret[:-1] + "!", keys.CONSUMER_PREFIX)
    assert keys.digest(secret) != keys.digest(keys.generate(keys.CONSUMER_PREFIX))
    assert len(keys.digest(secret)) == 64
    assert keys.display_prefix(secret) == secret[:16]
