"""Placement over the registry, without sockets: every `provider` preference, the sorts, power of
two choices, and what the upstream admits. The same preferences through real processes are in
tests/integration/test_routing.py."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import msgspec

from coordinator.market import placement
from coordinator.market.placement import Routing
from coordinator.market.registry import ConnectedAgent, Performance, Registry
from coordinator.market.upstream import Upstream, median_price
from coordinator.money.metering import Price
from shared.openai import ProviderPreferences
from shared.protocol import ModelOffer


class _Link:
    async def send(self, message: object) -> None:
        raise AssertionError("placement must not talk to agents")

    async def close(self, code: int, reason: str) -> None:
        raise AssertionError("placement must not talk to agents")


def _agent(
    agent_id: str,
    *,
    price: int = 100,
    in_flight: int = 0,
    capacity: int = 4,
    provider: int = 1,
    trust: float = 100.0,
    ttft_ms: float | None = None,
    tokens_per_s: float | None = None,
    quantization: str = "",
    slug: str = "m",
) -> ConnectedAgent:
    agent = ConnectedAgent(
        agent_id,
        provider,
        next(_tokens),  # each its own token: a token's agents share their averages
        {slug: ModelOffer(slug, slug, price, price, quantization=quantization)},
        capacity,
        _Link(),
        0.0,
        in_flight=in_flight,
        trust=trust,
    )
    if ttft_ms is not None or tokens_per_s is not None:
        agent.performance[slug] = Performance(ttft_ms, tokens_per_s)
    return agent


_tokens = itertools.count(1)


def _registry(*agents: ConnectedAgent) -> Registry:
    registry = Registry()
    for agent in agents:
        registry.add(agent)
    return registry


def _routing(**prefs: object) -> Routing:
    return Routing.of(msgspec.convert(prefs, ProviderPreferences))


def _pick(registry: Registry, routing: Routing = placement.DEFAULT_ROUTING, **kw: object) -> str | None:
    choice = placement.choose(registry, "m", routing, **kw)  # type: ignore[arg-type]
    return None if choice is None else choice.agent.agent_id


def test_sorts_pick_the_best_by_their_key_and_say_so() -> None:
    registry = _registry(
        _agent("cheap-slow", price=10, ttft_ms=900, tokens_per_s=5, in_flight=3),
        _agent("dear-fast", price=500, ttft_ms=40, tokens_per_s=50),
        _agent("mid-throughput", price=100, ttft_ms=300, tokens_per_s=200),
    )
    for sort, best in (("price", "cheap-slow"), ("latency", "dear-fast"), ("throughput", "mid-throughput")):
        choice = placement.choose(registry, "m", _routing(sort=sort))
        assert choice is not None and choice.agent.agent_id == best and choice.reason == f"sort:{sort}"
        assert choice.candidates == 3
    # equal keys: the less loaded one wins
    tied = _registry(_agent("busy", price=10, in_flight=3), _agent("idle", price=10, in_flight=0))
    assert _pick(tied, _routing(sort="price")) == "idle"


def test_filters_max_price_min_trust_threshold_quantizations() -> None:
    registry = _registry(
        _agent("cheap", price=100, trust=55, quantization="q4_k_m"),
        _agent("dear", price=3000, trust=90, quantization="q8_0"),
        _agent("plain", price=200, trust=70),
    )
    # max_price is in USD per 1M tokens: 0.2 USD/1M = 200 nano-USD per token
    assert _pick(registry, _routing(sort="price", max_price={"prompt": 0.15})) == "cheap"
    assert _pick(registry, _routing(sort="price", max_price={"prompt": 0.05})) is None
    assert _pick(registry, _routing(sort="price", max_price={"completion": 1, "prompt": 0.2})) == "cheap"
    assert _pick(registry, _routing(sort="price", min_trust=60)) == "plain"
    assert _pick(registry, _routing(sort="price"), trust_floor=80) == "dear"  # the pool's threshold
    assert _pick(registry, _routing(sort="price", min_trust=95)) is None
    assert _pick(registry, _routing(sort="price", quantizations=["q8_0"])) == "dear"
    assert _pick(registry, _routing(sort="price", quantizations=["Q8_0", "unknown"])) == "plain"
    assert _pick(registry, _routing(quantizations=["fp16"])) is None
    # OpenRouter's precision classes match the labels they cover
    assert _pick(registry, _routing(sort="price", quantizations=["int8"])) == "dear"
    assert _pick(registry, _routing(sort="price", quantizations=["int4", "int8"])) == "cheap"


def test_only_ignore_order_by_agent_or_provider() -> None:
    registry = _registry(
        _agent("a1", provider=7, price=500),
        _agent("a2", provider=7, price=400),
        _agent("b1", provider=8, price=100),
    )
    assert _pick(registry, _routing(sort="price", only=["a1"])) == "a1"
    assert _pick(registry, _routing(sort="price", only=[7])) == "a2"  # a provider id, as x_pool gives it
    assert _pick(registry, _routing(sort="price", ignore=["8"])) == "a2"
    assert _pick(registry, _routing(sort="price", ignore=["b1", "a2"])) == "a1"
    assert _pick(registry, _routing(only=["nobody"])) is None
    choice = placement.choose(registry, "m", _routing(order=["8", "a1"]))
    assert choice is not None and (choice.agent.agent_id, choice.reason) == ("b1", "order")
    assert _pick(registry, _routing(order=["8", "a1"]), exclude={"b1"}) == "a1"
    # nobody in `order` is free: others may serve it, unless fallbacks are off
    assert _pick(registry, _routing(order=["8"], sort="price"), exclude={"b1"}) == "a2"
    assert _pick(registry, _routing(order=["8"], allow_fallbacks=False), exclude={"b1"}) is None


def test_full_draining_and_excluded_agents_are_skipped() -> None:
    registry = _registry(_agent("full", in_flight=2, capacity=2), _agent("ok"), _agent("draining"))
    registry.get("draining").draining = True  # type: ignore[union-attr]
    assert _pick(registry) == "ok"
    assert placement.choose(registry, "m").reason == "sole_candidate"  # type: ignore[union-attr]
    assert _pick(registry, exclude={"ok"}) is None
    assert _pick(registry, max_price=Price(50, 50)) is None  # what the consumer's hold covers


def test_power_of_two_choices_leans_to_the_best_without_herding() -> None:
    """Three agents with clearly ranked costs: the best wins both of its pairings (2/3 of draws),
    the middle one its pairing with the worst (1/3), the worst never; and load moves traffic."""
    registry = _registry(
        _agent("best", price=100, ttft_ms=100, tokens_per_s=50),
        _agent("mid", price=150, ttft_ms=100, tokens_per_s=50),
        _agent("worst", price=800, ttft_ms=400, tokens_per_s=20),
    )
    rng = random.Random(7)
    picks = Counter(_pick(registry, rng=rng) for _ in range(3000))
    assert picks["worst"] == 0
    assert 1800 < picks["best"] < 2200 and 800 < picks["mid"] < 1200, picks
    assert placement.choose(registry, "m", rng=rng).reason == "power_of_two"  # type: ignore[union-attr]
    # the best agent, busy at 3/4, now loses to the idle middle one (price 210 x 1.75 vs 310 x 1)
    registry.get("best").in_flight = 3  # type: ignore[union-attr]
    picks = Counter(_pick(registry, rng=rng) for _ in range(3000))
    assert picks["mid"] > picks["best"] > 0, picks


def test_cost_weighs_trust_and_observed_speed() -> None:
    slow = _registry(_agent("slow", ttft_ms=2000, tokens_per_s=2), _agent("fast", ttft_ms=50, tokens_per_s=80))
    assert Counter(_pick(slow, rng=random.Random(1)) for _ in range(50)) == Counter({"fast": 50})
    doubtful = _registry(_agent("doubtful", trust=45), _agent("trusted", trust=95))
    assert Counter(_pick(doubtful, rng=random.Random(1)) for _ in range(50)) == Counter({"trusted": 50})
    # an agent never measured is taken as the median of the others, so it still gets tried
    fresh = _registry(_agent("new"), _agent("known", ttft_ms=100, tokens_per_s=30, price=101))
    assert _pick(fresh, rng=random.Random(1)) == "new"


def test_upstream_admission() -> None:
    price = Price(1000, 2000)
    assert Routing().admits_upstream(price)
    assert not _routing(allow_fallbacks=False).admits_upstream(price)
    assert not _routing(only=["a1"]).admits_upstream(price)
    assert _routing(only=["a1", "platform"]).admits_upstream(price)
    assert not _routing(ignore=["platform"]).admits_upstream(price)
    assert not _routing(max_price={"completion": 1.5}).admits_upstream(price)
    assert _routing(max_price={"completion": 2}).admits_upstream(price)
    assert not _routing(quantizations=["q4_k_m"]).admits_upstream(price)
    assert _routing(quantizations=["unknown"]).admits_upstream(price)


def test_the_pool_price_is_the_median_offer_counting_each_provider_once_at_its_cheapest() -> None:
    assert median_price([]) is None
    offers = [("a", Price(10, 20)), ("b", Price(100, 200)), ("c", Price(1000, 2000))]
    assert median_price(offers) == Price(100, 200)
    swarm = [("d", Price(1, 1))] * 5  # one provider's many agents: one offer
    assert median_price(offers + swarm) == Price(10, 20)  # lower middle of 1, 10, 100, 1000
    assert median_price([("a", Price(10, 200)), ("a", Price(50, 20))]) == Price(10, 20)  # its cheapest of each
    assert median_price(offers + swarm, least=5) is None  # fewer providers than asked for: no price
    costly = Upstream("http://127.0.0.1:9/v1", None, {"m": "m"}, 1.0, cost=Price(5, 50))
    costly.reprice("m", Price(1, 100), Price(7, 800))
    assert costly.price_for("m") == Price(5, 100)  # never under what the upstream costs
    upstream = Upstream("http://127.0.0.1:9/v1", None, {"m": "m"}, 1.0)
    upstream.reprice("m", None, Price(7, 8))  # nobody ever offered it: the ceiling
    assert upstream.price_for("m") == Price(7, 8)
    upstream.reprice("m", Price(3, 4), Price(7, 8))
    upstream.reprice("m", None, Price(7, 8))  # offers gone: the last median stays
    assert upstream.price_for("m") == Price(3, 4)
    fixed = Upstream("http://127.0.0.1:9/v1", None, {"m": "m"}, 1.0, price=Price(0, 0))  # free on purpose
    fixed.reprice("m", Price(3, 4), Price(7, 8))
    assert fixed.price_for("m") == Price(0, 0)
