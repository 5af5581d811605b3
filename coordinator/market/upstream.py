"""The platform-owned fallback: any OpenAI-compatible endpoint the operator configures.

What consumers pay for a fallback request is the operator's price (``POOL_UPSTREAM_PRICE_IN`` /
``_OUT``) or, without one, the model's pool price: the median of the live offers of trusted agents
(their standing earned by jobs and canaries), one per provider (each provider's cheapest), from at
least ``MIN_PROVIDERS`` providers, so neither one agent asking next to nothing, nor a swarm of one
provider's agents, nor a few new accounts set it; while there are not that many, the last such
median; before there ever were, the directory's ceiling for the model (what an agent may ask at
most). Never below what the upstream costs the platform. Never free by accident.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from coordinator.money.metering import Price
from shared.backend import ENDPOINTS, Event, HttpClient, prepare_body, run_chat
from shared.protocol import CHAT

FREE = Price(0, 0)
MIN_PROVIDERS = 3  # trusted providers whose offers make a pool price


def median_price(offers: Iterable[tuple[str, Price]], least: int = 1) -> Price | None:
    """The median of ``(provider, price)`` offers, each provider counted once at its cheapest (by
    input and output price apart; the lower middle of an even count); ``None`` with offers from
    fewer than ``least`` providers."""
    cheapest: dict[str, Price] = {}
    for provider, price in offers:
        had = cheapest.get(provider)
        cheapest[provider] = price if had is None else Price(min(had.input, price.input), min(had.output, price.output))
    if not cheapest or len(cheapest) < least:
        return None
    middle = (len(cheapest) - 1) // 2
    return Price(
        sorted(p.input for p in cheapest.values())[middle], sorted(p.output for p in cheapest.values())[middle]
    )


class Upstream:
    """``fixed`` is what consumers pay for a fallback request if the operator set it (else the pool
    price, :meth:`price_for`); ``cost`` what the upstream bills the platform; ``kinds`` the job
    kinds it serves per model (a model not named there: chat)."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        models: dict[str, str],
        timeout: float,
        price: Price | None = None,
        cost: Price = FREE,
        kinds: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.models = models if base_url else {}
        self.kinds = kinds or {}
        self.fixed = price
        self.pool_prices: dict[str, Price] = {}  # per model, kept by :meth:`reprice`
        self.cost = cost
        self._base = base_url or ""
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = HttpClient(256, timeout, trust_env=True)  # an operator's proxy settings apply

    def serves(self, slug: str, kind: str = CHAT) -> bool:
        return slug in self.models and kind in self.kinds.get(slug, (CHAT,))

    def price_for(self, slug: str) -> Price:
        """What a consumer pays per token for ``slug`` through the upstream (the pool's price never
        below what the upstream costs)."""
        if self.fixed is not None:
            return self.fixed
        found = self.pool_prices.get(slug, FREE)
        return Price(max(found.input, self.cost.input), max(found.output, self.cost.output))

    def reprice(self, slug: str, live: Price | None, ceiling: Price) -> None:
        """Follow the pool: the median of the live offers, else the last one seen, else the ceiling."""
        if live is not None:
            self.pool_prices[slug] = live
        elif slug not in self.pool_prices:
            self.pool_prices[slug] = ceiling

    def run(self, slug: str, raw: bytes, *, stream: bool, want_usage: bool, kind: str = CHAT) -> AsyncIterator[Event]:
        body = prepare_body(raw, self.models[slug], stream)
        url = self._base + ENDPOINTS[kind]
        return run_chat(self._client, url, body, stream=stream, want_usage=want_usage, headers=self._headers)

    async def aclose(self) -> None:
        await self._client.aclose()
