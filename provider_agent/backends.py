"""The agent's local model server: any OpenAI-compatible HTTP endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import msgspec

from provider_agent.config import AgentConfig
from shared.backend import Event, HttpClient, prepare_body, run_chat


class BackendUnavailable(Exception):
    """The backend did not answer ``GET /v1/models``."""


class _ModelList(msgspec.Struct):
    data: list[dict[str, object]] = []


class Backend:
    def __init__(self, config: AgentConfig) -> None:
        self.base_url = config.backend_url
        self._headers = {"authorization": f"Bearer {config.backend_api_key}"} if config.backend_api_key else {}
        self._client = HttpClient(config.max_concurrency + 4, None)

    async def model_names(self) -> list[str]:
        """The backend's model ids; raises :class:`BackendUnavailable` if it does not answer."""
        url = f"{self.base_url}/models"
        try:
            async with self._client.session().get(
                url, headers=self._headers, timeout=aiohttp.ClientTimeout(total=10.0)
            ) as response:
                status, content = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendUnavailable(f"cannot reach the backend at {url}: {exc or type(exc).__name__}") from None
        if status != 200:
            raise BackendUnavailable(f"the backend at {url} answered {status}")
        try:
            listing = msgspec.json.decode(content, type=_ModelList)
        except msgspec.DecodeError:
            raise BackendUnavailable(f"the backend at {url} did not answer with an OpenAI model list") from None
        return [str(entry.get("id")) for entry in listing.data]

    def chat(self, request: bytes, backend_model: str, *, stream: bool, want_usage: bool) -> AsyncIterator[Event]:
        body = prepare_body(request, backend_model, stream)
        return run_chat(
            self._client,
            f"{self.base_url}/chat/completions",
            body,
            stream=stream,
            want_usage=want_usage,
            headers=self._headers,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
