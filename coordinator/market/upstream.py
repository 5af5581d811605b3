"""The platform-owned fallback: any OpenAI-compatible endpoint the operator configures."""

from __future__ import annotations

from collections.abc import AsyncIterator

from coordinator.money.metering import Price
from shared.backend import Event, HttpClient, prepare_body, run_chat

FREE = Price(0, 0)


class Upstream:
    """``price`` is what consumers pay for a fallback request, ``cost`` what the upstream bills the platform."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        models: dict[str, str],
        timeout: float,
        price: Price = FREE,
        cost: Price = FREE,
    ) -> None:
        self.models = models if base_url else {}
        self.price = price
        self.cost = cost
        self._url = f"{base_url}/chat/completions" if base_url else ""
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = HttpClient(256, timeout, trust_env=True)  # an operator's proxy settings apply

    def serves(self, slug: str) -> bool:
        return slug in self.models

    def run(self, slug: str, raw: bytes, *, stream: bool, want_usage: bool) -> AsyncIterator[Event]:
        body = prepare_body(raw, self.models[slug], stream)
        return run_chat(self._client, self._url, body, stream=stream, want_usage=want_usage, headers=self._headers)

    async def aclose(self) -> None:
        await self._client.aclose()
