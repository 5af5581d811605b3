"""What idle connected agents cost the coordinator: its resident memory with 1, 100 and 10,000
agents connected and serving nothing, over what it used before they came.

The agents are the real ``pool-agent`` code (:class:`provider_agent.connection.Agent`: websocket,
hello, heartbeats), many of them in this one process around one shared backend client, so that ten
thousand fit on a 2-core machine; only the coordinator's memory is measured.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from provider_agent.backends import Backend
from provider_agent.config import AgentConfig, ModelSpec, coordinator_url
from provider_agent.connection import Agent
from tests.bench import procs

COUNTS = (1, 100, 10_000)
BATCH = 250  # agents dialling at once


async def _agents_connected(client: httpx.AsyncClient, url: str) -> int:
    return int((await client.get(f"{url}/healthz")).json()["agents"])


async def measure(
    pool_url: str, token: str, backend_url: str, model: str, coordinator_pid: int, counts: tuple[int, ...] = COUNTS
) -> dict[int, dict[str, float]]:
    """Connect agents up to each of ``counts`` in turn; per count, the coordinator's RSS growth per
    agent. Every agent is stopped before returning."""
    config = AgentConfig(
        coordinator_url=coordinator_url(pool_url),
        token=token,
        backend_url=f"{backend_url}/v1",
        models=(ModelSpec(model, model),),
        price_in=1,
        price_out=1,
        max_concurrency=1,
        log_level="WARNING",
    )
    backend = Backend(config)
    tasks: list[asyncio.Task[None]] = []
    rows: dict[int, dict[str, float]] = {}
    print("\nidle agents: coordinator RSS with N agents connected and idle, over its RSS before them")
    async with httpx.AsyncClient(timeout=30) as client:
        before_count = await _agents_connected(client, pool_url)
        await asyncio.sleep(1)
        baseline = procs.rss_kb([coordinator_pid])
        try:
            for count in counts:
                while len(tasks) < count:
                    batch = min(BATCH, count - len(tasks))
                    tasks += [asyncio.create_task(Agent(config, backend).run()) for _ in range(batch)]
                    deadline = time.monotonic() + 120
                    while await _agents_connected(client, pool_url) < before_count + len(tasks):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{len(tasks)} agents did not all connect")
                        await asyncio.sleep(0.1)
                await asyncio.sleep(3)  # a heartbeat or two on every connection
                rss = procs.rss_kb([coordinator_pid])
                per_agent = (rss - baseline) / count
                rows[count] = {"coordinator_rss_kb": rss, "kb_per_agent": per_agent}
                print(f"{count:>7} agents | coordinator RSS {rss:>8} KB | {per_agent:>7.1f} KB per agent", flush=True)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await backend.aclose()
    return rows
