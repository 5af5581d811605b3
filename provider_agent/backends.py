"""The agent's local model server: any OpenAI-compatible HTTP endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from provider_agent.config import AgentConfig
from shared.backend import ENDPOINTS, Event, HttpClient, prepare_body, run_chat
from shared.protocol import CHAT, COMPLETION, EMBEDDING, KINDS

# The smallest request of each kind: what a probe asks of the backend (one token at most).
_PROBES: dict[str, dict[str, object]] = {
    CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    COMPLETION: {"prompt": "Hi", "max_tokens": 1},
    EMBEDDING: {"input": "Hi"},
}
PROBE_TIMEOUT = 60.0  # seconds per probe: a cold backend loads its model on the first request


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

    async def kinds(self, backend_model: str) -> list[str]:
        """The job kinds the backend serves ``backend_model`` for, found by asking it the smallest
        request of each at once: those it answers with 200. None at all (the backend failing every
        one) is taken as chat, which is what agents announced before kinds existed."""
        answers = await asyncio.gather(*(self._probe(kind, backend_model) for kind in KINDS))
        return [kind for kind, ok in zip(KINDS, answers, strict=True) if ok] or [CHAT]

    async def _probe(self, kind: str, backend_model: str) -> bool:
        body = msgspec.json.encode({"model": backend_model, **_PROBES[kind]})
        try:
            async with self._client.session().post(
                f"{self.base_url}{ENDPOINTS[kind]}",
                data=body,
                headers={"content-type": "application/json", **self._headers},
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            ) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def run(
        self, kind: str, request: bytes, backend_model: str, *, stream: bool, want_usage: bool
    ) -> AsyncIterator[Event]:
        """Run a job of ``kind`` on the backend: its events (:func:`shared.backend.run_chat`)."""
        body = prepare_body(request, backend_model, stream)
        return run_chat(
            self._client,
            f"{self.base_url}{ENDPOINTS[kind]}",
            body,
            stream=stream,
            want_usage=want_usage,
            headers=self._headers,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
