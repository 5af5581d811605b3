"""Coordinator settings, read once from ``POOL_*`` environment variables and passed in."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///pool.db"


class SettingsError(ValueError):
    """An environment variable holds a value the coordinator cannot use."""


def _parse_models(value: str) -> dict[str, str]:
    """Parse ``slug=upstream-id,slug2=upstream-id2`` (a bare ``slug`` maps to itself)."""
    mapping: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        slug, _, target = item.partition("=")
        slug, target = slug.strip(), target.strip()
        if not slug:
            raise SettingsError(f"POOL_UPSTREAM_MODELS: empty slug in {item!r}")
        mapping[slug] = target or slug
    return mapping


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    heartbeat_interval: float = 5.0
    heartbeat_misses: int = 3
    max_body_bytes: int = 4 * 1024 * 1024
    max_frame_bytes: int = 8 * 1024 * 1024
    max_messages_per_second: int = 20_000
    hello_timeout: float = 10.0
    first_chunk_timeout: float = 120.0
    idle_timeout: float = 120.0
    job_deadline: float = 600.0
    upstream_base_url: str | None = None
    upstream_api_key: str | None = None
    upstream_models: dict[str, str] = field(default_factory=dict)
    upstream_timeout: float = 300.0
    status_window_seconds: float = 900.0
    no_capacity_retry_after: int = 5
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: ``os.environ``); bad values raise ``SettingsError``."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, kind in _FIELDS.items():
            raw = env.get(f"POOL_{name.upper()}")
            if raw is None or raw == "":
                continue
            try:
                values[name] = kind(raw)
            except ValueError as exc:
                raise SettingsError(f"POOL_{name.upper()}={raw!r}: {exc}") from None
        return cls(**values)  # type: ignore[arg-type]

    @property
    def stale_after(self) -> float:
        """Seconds without a heartbeat after which an agent is dropped."""
        return self.heartbeat_interval * self.heartbeat_misses


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be positive")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be positive")
    return value


_FIELDS: dict[str, Callable[[str], object]] = {
    "database_url": str,
    "heartbeat_interval": _positive_float,
    "heartbeat_misses": _positive_int,
    "max_body_bytes": _positive_int,
    "max_frame_bytes": _positive_int,
    "max_messages_per_second": _positive_int,
    "hello_timeout": _positive_float,
    "first_chunk_timeout": _positive_float,
    "idle_timeout": _positive_float,
    "job_deadline": _positive_float,
    "upstream_base_url": lambda raw: raw.rstrip("/"),
    "upstream_api_key": str,
    "upstream_models": _parse_models,
    "upstream_timeout": _positive_float,
    "status_window_seconds": _positive_float,
    "no_capacity_retry_after": _positive_int,
    "log_level": str.upper,
}
