"""Choose an agent for a request: a pure function of the registry."""

from __future__ import annotations

import random
from collections.abc import Collection

from coordinator.metering import Price
from coordinator.registry import ConnectedAgent, Registry


def _score(agent: ConnectedAgent, slug: str) -> tuple[float, int]:
    offer = agent.models[slug]
    return (agent.in_flight / agent.max_concurrency, offer.price_in + offer.price_out)


def offer_price(agent: ConnectedAgent, slug: str) -> Price:
    offer = agent.models[slug]
    return Price(offer.price_in, offer.price_out)


def choose(
    registry: Registry, slug: str, exclude: Collection[str] = (), max_price: Price | None = None
) -> ConnectedAgent | None:
    """The least-loaded agent serving ``slug`` with a free slot (cheaper first, then at random),
    among those no dearer than ``max_price`` (what the consumer's hold covers)."""
    candidates = [
        a
        for a in registry.serving(slug)
        if a.free_slots > 0
        and a.agent_id not in exclude
        and (max_price is None or max_price.covers(offer_price(a, slug)))
    ]
    if not candidates:
        return None
    best = min(_score(a, slug) for a in candidates)
    return random.choice([a for a in candidates if _score(a, slug) == best])
