"""Agent configuration: command-line flags > ``POOL_AGENT_*`` environment > ``--config FILE.toml``."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shared.money import usd_per_million_to_nano_per_token
from shared.protocol import KINDS


class ConfigError(ValueError):
    """The configuration is incomplete or holds an unusable value."""


@dataclass(frozen=True)
class ModelSpec:
    slug: str  # empty: the coordinator finds it from the backend name in its directory
    backend_model: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``BACKEND_NAME`` (the coordinator maps it to a slug) or ``SLUG=BACKEND_NAME``."""
        slug, sep, backend = text.strip().partition("=")
        slug, backend = slug.strip(), backend.strip()
        if not sep:
            slug, backend = "", slug
        if not backend or (sep and not slug):
            raise ConfigError(f"model {text!r}: expected BACKEND_NAME or SLUG=BACKEND_NAME")
        return cls(slug, backend)

    @property
    def name(self) -> str:
        return self.slug or self.backend_model


@dataclass(frozen=True)
class AgentConfig:
    coordinator_url: str  # ws(s)://host:port/v1/agent/connect
    token: str
    backend_url: str  # http(s)://host:port/v1
    models: tuple[ModelSpec, ...]
    price_in: int  # nano-USD per token
    price_out: int
    max_concurrency: int = 4
    backend_api_key: str | None = None
    context_window: int | None = None
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    drain_timeout: float = 600.0
    log_level: str = "INFO"
    other_coordinators: tuple[str, ...] = ()  # tried in turn after the first (``--coordinator A,B``)
    kinds: tuple[str, ...] = ()  # job kinds every model serves (empty: probe the backend at start)

    @property
    def coordinator_urls(self) -> tuple[str, ...]:
        return (self.coordinator_url, *self.other_coordinators)


# name -> (environment variable, kind)
FIELDS: dict[str, str] = {
    "coordinator": "str",
    "token": "str",
    "backend": "str",
    "backend_api_key": "str",
    "model": "list",
    "price_in": "str",
    "price_out": "str",
    "max_concurrency": "int",
    "context_window": "int",
    "reconnect_max": "float",
    "drain_timeout": "float",
    "log_level": "str",
    "kinds": "list",
}


def coordinator_url(text: str) -> str:
    """Accept ``http(s)://`` or ``ws(s)://`` with or without the connect path."""
    parts = urlsplit(text.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ConfigError(f"coordinator URL {text!r} must look like http://host:port or ws://host:port")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/agent/connect"):
        path += "/v1/agent/connect"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _coordinators(value: Any) -> tuple[str, ...]:
    """One coordinator URL or several (``A,B``, or a list in the config file), in the order to try."""
    items = value if isinstance(value, list) else str(value).split(",")
    urls = tuple(coordinator_url(str(item)) for item in items if str(item).strip())
    if not urls:
        raise ConfigError("--coordinator: no URL given")
    return urls


def backend_url(text: str) -> str:
    """The backend's OpenAI base URL, ending in ``/v1``."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"backend URL {text!r} must look like http://host:port")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, kind in FIELDS.items():
        raw = env.get(f"POOL_AGENT_{name.upper()}")
        if raw:
            values[name] = [item for item in raw.split(",") if item.strip()] if kind == "list" else raw
    return values


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if "models" in data and "model" not in data:
        data["model"] = data.pop("models")
    unknown = set(data) - set(FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    if isinstance(data.get("model"), str):
        data["model"] = [data["model"]]
    return data


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return number


def _float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not number > 0:
        raise ConfigError(f"{name} must be positive")
    return number


def _price(name: str, value: Any) -> int:
    try:
        return usd_per_million_to_nano_per_token(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _kinds(value: Any) -> tuple[str, ...]:
    """``chat,completion,embedding`` (or a list in the config file): the kinds every model serves."""
    items = value if isinstance(value, list) else str(value).split(",")
    kinds = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ConfigError(f"kinds: {', '.join(unknown)} unknown (use {', '.join(KINDS)})")
    return kinds


def load(flags: Mapping[str, Any], env: Mapping[str, str], config_file: Path | None = None) -> AgentConfig:
    """Merge the three sources (flags win) and validate."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(_from_file(config_file))
    merged.update(_from_env(env))
    merged.update({k: v for k, v in flags.items() if v not in (None, [], "")})
    missing = [f"--{n.replace('_', '-')}" for n in ("coordinator", "token", "backend", "model") if not merged.get(n)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (flag, POOL_AGENT_* variable or config file)")
    coordinators = _coordinators(merged["coordinator"])
    models = tuple(ModelSpec.parse(str(m)) for m in merged["model"])
    if len({m.name for m in models}) != len(models):
        raise ConfigError("a model slug is given twice")
    return AgentConfig(
        coordinator_url=coordinators[0],
        other_coordinators=coordinators[1:],
        token=str(merged["token"]),
        backend_url=backend_url(str(merged["backend"])),
        models=models,
        price_in=_price("price-in", merged.get("price_in", 0)),
        price_out=_price("price-out", merged.get("price_out", 0)),
        max_concurrency=_int("max-concurrency", merged.get("max_concurrency", 4), 1),
        backend_api_key=merged.get("backend_api_key") or None,
        context_window=_int("context-window", merged["context_window"], 1) if merged.get("context_window") else None,
        reconnect_max=_float("reconnect-max", merged.get("reconnect_max", 30.0)),
        drain_timeout=_float("drain-timeout", merged.get("drain_timeout", 600.0)),
        log_level=str(merged.get("log_level", "INFO")).upper(),
        kinds=_kinds(merged["kinds"]) if merged.get("kinds") else (),
    )
