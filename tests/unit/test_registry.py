"""The registry of connected agents: one token is one identity, and the moving averages of speed."""

from __future__ import annotations

import pytest

from coordinator.market.registry import ConnectedAgent, Performance, Registry


def test_one_token_is_one_identity_for_concurrency_and_speed() -> None:
    registry = Registry()
    agents = [
        ConnectedAgent(f"agt_{i}", 1, 7, {}, max_concurrency=4, link=None, last_seen=0.0)  # type: ignore[arg-type]
        for i in range(3)
    ]
    for agent in agents:
        agent.concurrency_cap = 2
        registry.add(agent)
    assert registry.of_token(7) == 3
    assert len({id(agent.share) for agent in agents}) == 1
    agents[0].in_flight = agents[0].share.in_flight = 2
    assert [agent.free_slots for agent in agents] == [0, 0, 0]
    agents[0].concurrency_cap = agents[1].concurrency_cap = agents[2].concurrency_cap = None
    assert [agent.free_slots for agent in agents] == [2, 4, 4]


def test_moving_averages() -> None:
    performance = Performance()
    performance.observe(100.0, None)
    performance.observe(None, 20.0)
    assert (performance.ttft_ms, performance.tokens_per_s) == (100.0, 20.0)
    performance.observe(200.0, 40.0)
    assert performance.ttft_ms == pytest.approx(120.0) and performance.tokens_per_s == pytest.approx(24.0)
