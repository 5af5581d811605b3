"""Placement from the model indexes (coordinator/market/index.py) against the plain full scan
(``placement.choose(…, scan=True)``): the same winner and candidate count for the sorted modes, the same
candidate count and the same distribution for power of two choices, and the same hold ceiling, on
registries whose agents keep changing (jobs start and end, trust moves, timings arrive, agents
drain, connect and leave)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from coordinator.market import placement
from coordinator.market.placement import Routing
from coordinator.market.registry import ConnectedAgent, Performance, Registry, observe
from coordinator.market.upstream import Upstream
from coordinator.money.metering import Price
from shared.openai import ProviderPreferences
from shared.protocol import ModelOffer

_ids = itertools.count(1)


class _Link:
    async def send(self, message: object) -> None:
        raise AssertionError("placement must not talk to agents")

    async def close(self, code: int, reason: str) -> None:
        raise AssertionError("placement must not talk to agents")


def _agent(rng: random.Random, token_id: int | None = None) -> ConnectedAgent:
    n = next(_ids)
    price = rng.choice([100, 100, 100, 200, 300, rng.randint(50, 500)])  # many ties, as default prices make
    agent = ConnectedAgent(
        f"agt_{n}",
        n % 7,
        token_id if token_id is not None else n,
        {"m": ModelOffer("m", "m", price, rng.choice([price, price * 2]))},
        rng.randint(1, 4),
        _Link(),
        0.0,
        trust=rng.choice([100.0, 100.0, rng.uniform(0, 100)]),
    )
    roll = rng.random()
    if roll < 0.6:  # measured; the rest not yet, or only one of the two
        agent.performance["m"] = Performance(rng.choice([120.0, rng.uniform(20, 900)]), rng.uniform(1, 200))
    elif roll < 0.75:
        agent.performance["m"] = Performance(None, rng.uniform(1, 200))
    elif roll < 0.85:
        agent.performance["m"] = Performance(rng.uniform(20, 900), None)
    return agent


def _registry(rng: random.Random, count: int) -> Registry:
    registry = Registry()
    for _ in range(count):
        registry.add(_agent(rng))
    return registry


def _change(registry: Registry, rng: random.Random) -> None:
    """One thing that happens to a pool, through the same attributes the coordinator sets."""
    agents = registry.agents()
    agent = rng.choice(agents)
    match rng.randrange(7):
        case 0:  # a job starts (as the job table counts it)
            agent.in_flight += 1
            agent.share.in_flight += 1
        case 1:  # a job ends
            agent.in_flight = max(0, agent.in_flight - 1)
            agent.share.in_flight = max(0, agent.share.in_flight - 1)
        case 2:  # new evidence
            agent.trust = rng.uniform(0, 100)
            agent.concurrency_cap = rng.choice([None, 1, 2])
        case 3:  # a job's timings
            observe(agent, "m", rng.randint(0, 50), assigned_at=0.0, first_at=rng.uniform(0.01, 0.5), stream=True)
        case 4:
            agent.draining = True
        case 5:
            registry.remove(agent.agent_id)
        case _:  # a second agent of the same token: they share a job count and averages
            registry.add(_agent(rng, token_id=agent.token_id))


ROUTINGS = [
    Routing.of(ProviderPreferences(sort=sort, min_trust=min_trust))
    for sort in ("price", "latency", "throughput")
    for min_trust in (None, 50)
]


def _same_sorted(registry: Registry, rng: random.Random) -> None:
    agents = registry.agents()
    exclude = {a.agent_id for a in rng.sample(agents, min(2, len(agents)))} if rng.random() < 0.3 else set()
    cap = Price(rng.choice([150, 400, 10**9]), rng.choice([300, 800, 10**9])) if rng.random() < 0.3 else None
    for routing in ROUTINGS:
        for floor in (0.0, 40.0):
            kw = {"trust_floor": floor, "exclude": exclude, "max_price": cap}
            indexed = placement.choose(registry, "m", routing, **kw)  # type: ignore[arg-type]
            scanned = placement.choose(registry, "m", routing, scan=True, **kw)  # type: ignore[arg-type]
            assert (indexed is None) == (scanned is None), (routing, kw)
            if indexed is not None and scanned is not None:
                assert indexed.agent is scanned.agent, (routing, kw)
                assert (indexed.reason, indexed.candidates) == (scanned.reason, scanned.candidates)


@pytest.mark.parametrize("seed", range(12))
def test_sorted_modes_pick_the_scans_winner_as_the_pool_changes(seed: int) -> None:
    rng = random.Random(seed)
    registry = _registry(rng, rng.choice([1, 3, 20, 200]))
    for _ in range(150):
        if len(registry) < 2:
            registry.add(_agent(rng))
        _change(registry, rng)
        _same_sorted(registry, rng)


@pytest.mark.parametrize("seed", range(6))
def test_power_of_two_counts_the_same_candidates_and_ceiling(seed: int) -> None:
    rng = random.Random(100 + seed)
    registry = _registry(rng, 60)
    upstream = Upstream(None, None, {}, 5.0)
    for _ in range(150):
        if len(registry) < 2:
            registry.add(_agent(rng))
        _change(registry, rng)
        exclude = {rng.choice(registry.agents()).agent_id} if rng.random() < 0.3 else set()
        for floor in (0.0, 40.0):
            indexed = placement.choose(registry, "m", trust_floor=floor, exclude=exclude, rng=rng)
            scanned = placement.choose(registry, "m", trust_floor=floor, exclude=exclude, rng=rng, scan=True)
            assert (indexed is None) == (scanned is None)
            if indexed is not None and scanned is not None:
                assert (indexed.reason, indexed.candidates) == (scanned.reason, scanned.candidates)
            offers = placement.prices(registry, upstream, ["m"], placement.DEFAULT_ROUTING, trust_floor=floor)
            listed = [
                placement.offer_price(a, "m")
                for a in placement.eligible(registry, "m", placement.DEFAULT_ROUTING, trust_floor=floor)
            ]
            expected = Price(max(p.input for p in listed), max(p.output for p in listed)) if listed else None
            assert offers.ceiling == expected
            if listed:
                assert offers.cheapest(lambda p: p.input + p.output) == min(listed, key=lambda p: p.input + p.output)


def test_power_of_two_draws_pairs_as_the_scan_does() -> None:
    """Frequencies of the chosen agent over many requests: the index's draws against the scan's
    ``random.sample`` of the candidates, within sampling noise (fixed seeds: the result is stable)."""
    rng = random.Random(7)
    registry = _registry(rng, 12)
    for agent in registry.agents()[:3]:
        agent.in_flight = agent.max_concurrency  # full: never drawn
    registry.agents()[3].trust = 10.0  # below the floor
    draws = 30_000
    indexed = Counter(placement.choose(registry, "m", trust_floor=40, rng=rng).agent.agent_id for _ in range(draws))  # type: ignore[union-attr]
    scanned = Counter(
        placement.choose(registry, "m", trust_floor=40, rng=rng, scan=True).agent.agent_id  # type: ignore[union-attr]
        for _ in range(draws)
    )
    assert set(indexed) == set(scanned) and len(indexed) >= 5
    for agent_id in scanned:  # each share within 1.5 points (several standard errors at 30,000 draws)
        assert abs(indexed[agent_id] - scanned[agent_id]) / draws < 0.015, (agent_id, indexed, scanned)


def test_the_index_follows_what_changes_a_free_slot() -> None:
    registry = Registry()
    rng = random.Random(1)
    a, b = _agent(rng, token_id=1), _agent(rng, token_id=1)
    for agent in (a, b):
        agent.max_concurrency, agent.trust = 2, 100.0
        registry.add(agent)
    index = registry.index("m")
    assert index is not None and set(index.open) == {a.agent_id, b.agent_id}
    a.concurrency_cap = b.concurrency_cap = 1  # new: one job at once for the whole token
    a.in_flight += 1
    a.share.in_flight += 1
    assert set(index.open) == set()  # b too: the token's one slot is taken
    a.in_flight -= 1
    a.share.in_flight -= 1
    assert set(index.open) == {a.agent_id, b.agent_id}
    b.draining = True
    assert set(index.open) == {a.agent_id}
    registry.remove(a.agent_id)
    assert set(index.open) == set() and index.trusted(0) == 0
