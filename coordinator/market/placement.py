"""Choose an agent for a request: a pure function of the registry and the consumer's preferences.

First the agents that may serve the request: a free slot, trusted enough, no dearer than the hold
covers, and allowed by the request's ``provider`` object. Then one of them: the first match of
``order``, else the best by ``sort``, else the better of two drawn at random (power of two choices)
by a cost that weighs price, observed speed, trust and load — so traffic leans to good agents
without every request herding onto the single best one.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from decimal import Decimal

from coordinator.market.catalog import precision, quantization_label
from coordinator.market.index import ModelIndex, Ranked
from coordinator.market.registry import ConnectedAgent, Performance, Registry
from coordinator.market.upstream import Upstream
from coordinator.money.metering import Price
from shared.money import NANO_PER_USD, TOKENS_PER_PRICE_UNIT
from shared.openai import ProviderPreferences
from shared.protocol import CHAT

PLATFORM = "platform"  # how consumers name the platform upstream in ``order``/``only``/``ignore``
UNKNOWN_QUANTIZATION = "unknown"

# Price differences below this many nano-USD per token ($0.01 per 1M) are noise, not a reason to move.
PRICE_FLOOR = 10
# Time to first token (ms) every agent pays anyway: differences well under it are noise.
TTFT_FLOOR_MS = 50.0

# Reasons in ``x_pool.route``.
POWER_OF_TWO = "power_of_two"
SOLE_CANDIDATE = "sole_candidate"
ORDER = "order"
FALLBACK = "fallback"


def sorted_by(key: str) -> str:
    return f"sort:{key}"


@dataclass(frozen=True)
class Routing:
    """A request's routing preferences in the pool's terms (nano-USD, agent and provider ids)."""

    sort: str | None = None
    max_price: Price | None = None
    min_trust: float = 0.0
    order: tuple[str, ...] = ()
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    allow_fallbacks: bool = True
    quantizations: frozenset[str] | None = None
    kind: str = CHAT  # the job's kind: only agents whose offer serves it may take it

    @classmethod
    def of(cls, prefs: ProviderPreferences | None, resolve: Callable[[str], str] = str, kind: str = CHAT) -> Routing:
        """The pool's terms for a request's ``provider`` object, for a job of ``kind``; ``resolve``
        turns a provider's slug into its id (other names, ids and ``platform`` pass unchanged)."""
        if prefs is None:
            return cls(kind=kind)
        max_price = None
        if prefs.max_price is not None:
            max_price = Price(nano_cap(prefs.max_price.prompt), nano_cap(prefs.max_price.completion))
        return cls(
            sort=prefs.sort,
            max_price=max_price,
            min_trust=prefs.min_trust or 0.0,
            order=tuple(resolve(str(name)) for name in prefs.order or ()),
            only=None if prefs.only is None else frozenset(resolve(str(name)) for name in prefs.only),
            ignore=frozenset(resolve(str(name)) for name in prefs.ignore or ()),
            allow_fallbacks=prefs.allow_fallbacks,
            quantizations=(
                None if prefs.quantizations is None else frozenset(quantization_label(q) for q in prefs.quantizations)
            ),
            kind=kind,
        )

    def admits(self, agent: ConnectedAgent, slug: str) -> bool:
        names = (agent.agent_id, agent.provider_id)
        if self.only is not None and not any(name in self.only for name in names):
            return False
        if any(name in self.ignore for name in names):
            return False
        if self.order and not self.allow_fallbacks and not any(name in self.order for name in names):
            return False
        offer = agent.models[slug]
        if not offer.serves(self.kind):
            return False
        if self.max_price is not None and not self.max_price.covers(Price(offer.price_in, offer.price_out)):
            return False
        if self.quantizations is None:
            return True
        label = offer.quantization or UNKNOWN_QUANTIZATION
        return label in self.quantizations or precision(label) in self.quantizations

    def admits_upstream(self, price: Price) -> bool:
        """Whether the platform upstream may serve this request (its quantisation is unknown)."""
        return (
            self.allow_fallbacks
            and (self.only is None or PLATFORM in self.only)
            and PLATFORM not in self.ignore
            and (self.max_price is None or self.max_price.covers(price))
            and (self.quantizations is None or UNKNOWN_QUANTIZATION in self.quantizations)
        )

    def rank_in_order(self, agent: ConnectedAgent) -> int:
        """Position of the agent's first match in ``order`` (``len(order)`` if none)."""
        for position, name in enumerate(self.order):
            if name in (agent.agent_id, agent.provider_id):
                return position
        return len(self.order)


DEFAULT_ROUTING = Routing()


def nano_cap(usd_per_million: float | None) -> int:
    """A price cap in nano-USD per token, rounded down (a cap is never exceeded by rounding)."""
    if usd_per_million is None:
        return 2**62
    return int(Decimal(str(usd_per_million)) * NANO_PER_USD / TOKENS_PER_PRICE_UNIT)


@dataclass(frozen=True)
class Choice:
    agent: ConnectedAgent
    reason: str
    candidates: int


def offer_price(agent: ConnectedAgent, slug: str) -> Price:
    offer = agent.models[slug]
    return Price(offer.price_in, offer.price_out)


def eligible(
    registry: Registry,
    slug: str,
    routing: Routing,
    *,
    trust_floor: float,
    exclude: Collection[str] = (),
    max_price: Price | None = None,
) -> list[ConnectedAgent]:
    """Agents that may take the request now (one pass over the model's agents: the hot loop)."""
    floor = max(trust_floor, routing.min_trust)
    most_in, most_out = (max_price.input, max_price.output) if max_price is not None else (2**63, 2**63)
    default = routing == DEFAULT_ROUTING
    found = []
    for agent in registry.serving(slug):
        offer = agent.models[slug]
        if (
            (offer.serves(CHAT) if default else routing.admits(agent, slug))
            and agent.free_slots > 0
            and agent.trust >= floor
            and offer.price_in <= most_in
            and offer.price_out <= most_out
            and agent.agent_id not in exclude
        ):
            found.append(agent)
    return found


def choose(
    registry: Registry,
    slug: str,
    routing: Routing = DEFAULT_ROUTING,
    *,
    trust_floor: float = 0.0,
    exclude: Collection[str] = (),
    max_price: Price | None = None,
    rng: random.Random | None = None,
    scan: bool = False,
) -> Choice | None:
    """The agent to try next for ``slug``, and why; ``None`` when no agent may take it. Found in the
    model's index (:mod:`coordinator.market.index`) when the routing allows; else, when the index
    can't settle a tie, or with ``scan`` (tests and benchmarks compare), by reading every agent of
    the model (:func:`_scanned`, the rules written plainly): the same choice either way."""
    index = registry.index(slug)
    if index is not None and not scan and _indexed(routing):
        found = _choose_indexed(index, slug, routing, trust_floor, exclude, max_price, rng or _RANDOM)
        if found is not SCAN:
            return found  # type: ignore[return-value]
    return _scanned(registry, slug, routing, trust_floor, exclude, max_price, rng)


def _scanned(
    registry: Registry,
    slug: str,
    routing: Routing,
    trust_floor: float,
    exclude: Collection[str],
    max_price: Price | None,
    rng: random.Random | None,
) -> Choice | None:
    candidates = eligible(registry, slug, routing, trust_floor=trust_floor, exclude=exclude, max_price=max_price)
    if not candidates:
        return None
    count = len(candidates)
    if routing.order or routing.sort is not None:
        typical = _typical(agent.performance.get(slug) for agent in candidates)
        if routing.order:
            first = min(routing.rank_in_order(agent) for agent in candidates)
            if first < len(routing.order):
                ordered = [agent for agent in candidates if routing.rank_in_order(agent) == first]
                return Choice(min(ordered, key=lambda agent: _cost(agent, slug, typical)), ORDER, count)
        if routing.sort is not None:
            key = _SORT_KEYS[routing.sort]
            best = min(
                candidates, key=lambda agent: (key(agent, slug, typical), _load(agent), _cost(agent, slug, typical))
            )
            return Choice(best, sorted_by(routing.sort), count)
    if count == 1:
        return Choice(candidates[0], SOLE_CANDIDATE, 1)
    # Power of two choices: only the pair is scored (an agent not yet measured is taken to do as
    # well as the other), so placement costs one pass over the candidates.
    pair = (rng or _RANDOM).sample(candidates, 2)
    return Choice(_better(pair, slug), POWER_OF_TWO, count)


def _better(pair: list[ConnectedAgent], slug: str) -> ConnectedAgent:
    typical = _typical(agent.performance.get(slug) for agent in pair)
    return min(pair, key=lambda agent: _cost(agent, slug, typical))


# --- the same choice from the model's index ------------------------------------------------------

SCAN = object()  # what the index can't settle: read every agent instead
DRAWS = 64  # draws for power of two choices before reading every agent (most draws hit)
_RANDOM = random.Random()


def _indexed(routing: Routing) -> bool:
    """Whether the index answers this routing: everything but ``sort`` and ``min_trust`` at its
    default, for chat (the index holds the agents that serve chat)."""
    return (
        routing.kind == CHAT
        and not routing.order
        and routing.only is None
        and not routing.ignore
        and routing.max_price is None
        and routing.quantizations is None
    )


def _choose_indexed(
    index: ModelIndex,
    slug: str,
    routing: Routing,
    trust_floor: float,
    exclude: Collection[str],
    max_price: Price | None,
    rng: random.Random,
) -> Choice | object | None:
    floor = max(trust_floor, routing.min_trust)
    most_in, most_out = (max_price.input, max_price.output) if max_price is not None else (2**63, 2**63)

    def admits(agent: ConnectedAgent) -> bool:  # the index holds only agents with a free slot
        offer = agent.models[slug]
        return (
            agent.trust >= floor
            and offer.price_in <= most_in
            and offer.price_out <= most_out
            and agent.agent_id not in exclude
        )

    count = _count(index, floor, exclude, most_in, most_out)
    if count == 0:
        return None
    if routing.sort is not None:
        best = _best_sorted(index, slug, routing.sort, admits)
        return best if best is SCAN else Choice(best, sorted_by(routing.sort), count)  # type: ignore[arg-type]
    first = _draw(index, floor, admits, rng)
    if count == 1:
        return SCAN if first is None else Choice(first, SOLE_CANDIDATE, 1)
    second = _draw(index, floor, lambda agent: agent is not first and admits(agent), rng)
    if first is None or second is None:
        return SCAN
    return Choice(_better([first, second], slug), POWER_OF_TWO, count)


def _count(index: ModelIndex, floor: float, exclude: Collection[str], most_in: int, most_out: int) -> int:
    """How many agents may take the request: those trusted enough, less those dearer than the cap
    (found from the dear end, so a cap that leaves everyone in costs nothing) and the excluded."""
    trusted = index.trusted(floor)
    if not trusted:
        return 0
    out: set[int] = set()
    for ranked, most in ((index.price_in, most_in), (index.price_out, most_out)):
        for key, agent in ranked.descending():
            if key <= most:
                break
            if agent.trust >= floor:
                out.add(agent.seq)
    for agent_id in exclude:
        tried = index.open.get(agent_id)
        if tried is not None and tried.trust >= floor:
            out.add(tried.seq)
    return trusted - len(out)


def _draw(
    index: ModelIndex, floor: float, admits: Callable[[ConnectedAgent], bool], rng: random.Random
) -> ConnectedAgent | None:
    """An agent ``admits`` takes, each as likely: drawn among those trusted enough until one is
    admitted (uniform among the admitted, as a draw from their list would be); ``None`` after
    ``DRAWS`` misses."""
    for _ in range(DRAWS):
        agent = index.draw_trusted(floor, rng)
        if admits(agent):
            return agent
    return None


def _best_sorted(
    index: ModelIndex, slug: str, sort: str, admits: Callable[[ConnectedAgent], bool]
) -> ConnectedAgent | object:
    """The best admitted agent by ``sort``, ties broken by load then cost, as :func:`_scanned`
    does. An agent not yet measured counts as the median of the measured candidates; the index
    settles that without the median unless the median could tie with the best (:data:`SCAN`)."""
    if sort == "price":
        ranked, unmeasured = index.price, None
    elif sort == "latency":
        ranked, unmeasured = index.ttft, index.no_ttft
    else:
        ranked, unmeasured = index.slowness, index.no_speed
    walk = ranked.ascending()
    group: list[ConnectedAgent] = []
    best_key: float | None = None
    past: list[tuple[float, ConnectedAgent]] = []  # the first entry after the best group
    for key, agent in walk:
        if best_key is not None and key != best_key:
            past.append((key, agent))
            break
        if admits(agent):
            group.append(agent)
            best_key = key
    if not group:
        return SCAN  # no candidate measured: all count as the same typical value
    if unmeasured and any(admits(agent) for agent in unmeasured.values()):
        # Those count as the median of the measured candidates, which lies above the best key once
        # more than twice the best group's size are measured at all: look for |group| + 1 worse.
        worse = 0
        for _, agent in itertools.chain(past, walk):
            worse += admits(agent)
            if worse > len(group):
                break
        if worse <= len(group):
            return SCAN
    if len(group) == 1:
        return group[0]
    if any(_unmeasured(agent, slug) for agent in group):
        return SCAN  # their cost needs the median of every candidate
    typical = Performance(TTFT_FLOOR_MS, 1.0)  # unused: every agent of the group is measured
    return min(group, key=lambda agent: (_load(agent), _cost(agent, slug, typical)))


def _unmeasured(agent: ConnectedAgent, slug: str) -> bool:
    known = agent.performance.get(slug)
    return known is None or known.ttft_ms is None or known.tokens_per_s is None


# --- the cost behind power of two choices ----------------------------------------------------------


def _typical(performances: Iterable[Performance | None]) -> Performance:
    """The median of the candidates' known averages: what an agent not yet measured is assumed to do."""
    known = [p for p in performances if p is not None]
    ttfts = [p.ttft_ms for p in known if p.ttft_ms is not None]
    speeds = [p.tokens_per_s for p in known if p.tokens_per_s is not None]
    return Performance(
        ttft_ms=statistics.median(ttfts) if ttfts else TTFT_FLOOR_MS,
        tokens_per_s=statistics.median(speeds) if speeds else 1.0,
    )


def _ttft(agent: ConnectedAgent, slug: str, typical: Performance) -> float:
    known = agent.performance.get(slug)
    value = known.ttft_ms if known is not None else None
    return value if value is not None else typical.ttft_ms or TTFT_FLOOR_MS


def _speed(agent: ConnectedAgent, slug: str, typical: Performance) -> float:
    known = agent.performance.get(slug)
    value = known.tokens_per_s if known is not None else None
    return max(1e-3, value if value is not None else typical.tokens_per_s or 1.0)


def _load(agent: ConnectedAgent) -> float:
    return agent.in_flight / agent.max_concurrency


def _cost(agent: ConnectedAgent, slug: str, typical: Performance) -> float:
    """Lower is better: price x slowness x (1 + load) / trust. A twice dearer agent must be about
    twice as fast (first token and generation speed together), or half as busy, to be preferred."""
    price = _price(agent, slug, typical) + PRICE_FLOOR
    slowness = math.sqrt((_ttft(agent, slug, typical) + TTFT_FLOOR_MS) / _speed(agent, slug, typical))
    return price * slowness * (1.0 + _load(agent)) * 100.0 / max(agent.trust, 1.0)


def _price(agent: ConnectedAgent, slug: str, typical: Performance) -> float:
    offer = agent.models[slug]
    return float(offer.price_in + offer.price_out)


def _slowness(agent: ConnectedAgent, slug: str, typical: Performance) -> float:
    return -_speed(agent, slug, typical)


_SORT_KEYS: dict[str, Callable[[ConnectedAgent, str, Performance], float]] = {
    "price": _price,
    "latency": _ttft,
    "throughput": _slowness,
}


@dataclass(frozen=True)
class Offers:
    """The prices of everyone who may serve a request now (agents and the upstream), as a hold
    needs them: the highest input and output prices, and the cheapest offer (read only when the
    highest are out of the consumer's reach)."""

    ceiling: Price | None  # None: nobody can serve the request
    everyone: Callable[[], list[Price]]

    def __bool__(self) -> bool:
        return self.ceiling is not None

    def cheapest(self, cost: Callable[[Price], int]) -> Price:
        return min(self.everyone(), key=cost)


NO_OFFERS = Offers(None, list)


def prices(registry: Registry, upstream: Upstream, slugs: list[str], routing: Routing, *, trust_floor: float) -> Offers:
    """What a hold must cover for a request of ``slugs``; empty when nobody can serve it."""

    def everyone() -> list[Price]:
        found = []
        for slug in slugs:
            found += [offer_price(agent, slug) for agent in eligible(registry, slug, routing, trust_floor=trust_floor)]
            if upstream.serves(slug, routing.kind) and routing.admits_upstream(upstream.price_for(slug)):
                found.append(upstream.price_for(slug))
        return found

    if not _indexed(routing):
        listed = everyone()
        ceiling = Price(max(p.input for p in listed), max(p.output for p in listed)) if listed else None
        return Offers(ceiling, lambda: listed)
    floor = max(trust_floor, routing.min_trust)
    most_in = most_out = -1
    for slug in slugs:
        index = registry.index(slug)
        if index is not None:
            most_in = max(most_in, _dearest(index.price_in, floor))
            most_out = max(most_out, _dearest(index.price_out, floor))
        fallback = upstream.price_for(slug)
        if upstream.serves(slug, routing.kind) and routing.admits_upstream(fallback):
            most_in, most_out = max(most_in, fallback.input), max(most_out, fallback.output)
    return Offers(Price(most_in, most_out) if most_in >= 0 else None, everyone)


def _dearest(ranked: Ranked, floor: float) -> int:
    """The highest price among agents trusted enough (-1: none)."""
    for key, agent in ranked.descending():
        if agent.trust >= floor:
            return int(key)
    return -1
