"""The provider agent's pure parts: configuration (flags, environment, file) and reconnect backoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from provider_agent.config import ConfigError, load
from provider_agent.connection import backoff_delay


def test_agent_config_precedence(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        'coordinator = "http://file:1"\ntoken = "t"\nbackend = "http://b:2"\nmodel = ["a=x"]\n'
        'price_in = "1"\nprice_out = "2"\nmax_concurrency = 3\n'
    )
    env = {"POOL_AGENT_COORDINATOR": "https://env:3", "POOL_AGENT_MODEL": "b,c=y"}
    config = load({"max_concurrency": 7, "model": []}, env, config_file)
    assert config.coordinator_url == "wss://env:3/v1/agent/connect"
    assert config.backend_url == "http://b:2/v1"
    assert [(m.slug, m.backend_model) for m in config.models] == [("", "b"), ("c", "y")]  # "b": the coordinator maps it
    assert (config.price_in, config.price_out, config.max_concurrency) == (1000, 2000, 7)


def test_several_coordinators_are_tried_in_the_order_given(tmp_path: Path) -> None:
    base = {"token": "t", "backend": "http://b", "model": ["m"]}
    config = load({**base, "coordinator": "http://a:1, https://b:2/"}, {})
    assert config.coordinator_urls == ("ws://a:1/v1/agent/connect", "wss://b:2/v1/agent/connect")
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        'coordinator = ["http://a:1", "http://c:3"]\ntoken = "t"\nbackend = "http://b"\nmodel = "m"\n'
    )
    assert load({}, {}, config_file).coordinator_urls == ("ws://a:1/v1/agent/connect", "ws://c:3/v1/agent/connect")
    with pytest.raises(ConfigError, match="coordinator URL"):
        load({**base, "coordinator": "http://a:1,ftp://b"}, {})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "missing --coordinator, --token, --backend, --model"),
        ({"coordinator": "ftp://x", "token": "t", "backend": "http://b", "model": ["m"]}, "coordinator URL"),
        ({"coordinator": "http://c", "token": "t", "backend": "b", "model": ["m"]}, "backend URL"),
        ({"coordinator": "http://c", "token": "t", "backend": "http://b", "model": ["m"], "price_in": "x"}, "price-in"),
        (
            {"coordinator": "http://c", "token": "t", "backend": "http://b", "model": ["m"], "max_concurrency": 0},
            "max-concurrency",
        ),
        ({"coordinator": "http://c", "token": "t", "backend": "http://b", "model": ["m", "m=x"]}, "twice"),
    ],
)
def test_agent_config_errors_are_clear(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(flags, {})


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    early = [backoff_delay(0, 0.5, 30) for _ in range(200)]
    late = [backoff_delay(20, 0.5, 30) for _ in range(200)]
    assert all(0.25 <= d <= 0.5 for d in early)
    assert all(0.25 <= d <= 30 for d in late) and max(late) > 10
    assert len(set(late)) > 100  # jittered, not a fixed schedule
