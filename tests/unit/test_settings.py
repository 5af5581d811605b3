"""The coordinator's settings from the environment, and the values it refuses."""

from __future__ import annotations

import pytest

from coordinator.core.settings import Settings, SettingsError


def test_coordinator_settings_from_env() -> None:
    settings = Settings.from_env(
        {"POOL_UPSTREAM_MODELS": "a=up-a, b", "POOL_HEARTBEAT_INTERVAL": "2", "POOL_UPSTREAM_BASE_URL": "http://u/v1/"}
    )
    assert settings.upstream_models == {"a": "up-a", "b": "b"}
    assert settings.stale_after == 6
    assert settings.upstream_base_url == "http://u/v1"
    with pytest.raises(SettingsError, match="POOL_HEARTBEAT_INTERVAL"):
        Settings.from_env({"POOL_HEARTBEAT_INTERVAL": "-1"})


def test_money_settings() -> None:
    settings = Settings.from_env({"POOL_PLATFORM_FEE": "0.125", "POOL_UPSTREAM_PRICE_OUT": "2.5"})
    assert (settings.fee_bps, settings.upstream_price_out) == (1250, 2500)
    for name, raw in (
        ("PLATFORM_FEE", "1.5"),
        ("PLATFORM_FEE", "0.12345"),
        ("JWT_ALGORITHMS", "HS256,RS256"),
        ("JWT_ALGORITHMS", "none"),
        ("RATE_LIMIT_RPM", "0"),
    ):
        with pytest.raises(SettingsError):
            Settings.from_env({f"POOL_{name}": raw})


def test_replica_mode_needs_postgresql() -> None:
    pg = "postgresql+asyncpg://pool@db/pool"
    settings = Settings.from_env({"POOL_REDIS_URL": "redis://cache:6379/0", "POOL_DATABASE_URL": pg})
    assert (settings.redis_url, settings.redis_prefix) == ("redis://cache:6379/0", "pool:")
    with pytest.raises(SettingsError, match="POOL_REDIS_URL runs this coordinator as one replica"):
        Settings.from_env({"POOL_REDIS_URL": "redis://cache:6379/0"})  # the SQLite default
    with pytest.raises(SettingsError, match="POOL_REDIS_URL"):
        Settings.from_env({"POOL_REDIS_URL": "cache:6379", "POOL_DATABASE_URL": pg})
    assert Settings.from_env({}).redis_url is None  # alone, with no Redis: the embedded default
