"""The cluster as `make cluster` runs it (scripts/cluster.py): three coordinator replicas on
PostgreSQL and Redis behind a real HAProxy (deploy/haproxy.cfg), llama.cpp's server with
SmolLM2-135M-Instruct behind two agents that dial through HAProxy, and consumers on the official
OpenAI SDK. A replica holding no agent serves through another's; every replica shows the same pool;
SIGTERM on a replica loses no request that goes through HAProxy and moves its agent; SIGKILL on one
moves its agent too and leaves the books whole."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from scripts import cluster as cluster_script
from scripts import localpool
from scripts.cluster import Cluster
from tests.conftest import redis_url
from tests.harness import agents_at, in_thread, new_consumer
from tests.ledger_checks import books_of
from tests.waiting import eventually

SLUG = "smollm2-135m"
MSG = [{"role": "user", "content": "Name three colors."}]


class Running:
    def __init__(self, cluster: Cluster, key: str, database: str, workdir: Path) -> None:
        self.cluster, self.key, self.database, self.workdir = cluster, key, database, workdir

    def client(self, url: str) -> OpenAI:
        return OpenAI(base_url=f"{url}/v1", api_key=self.key, max_retries=0, timeout=60)

    def local_agents(self) -> dict[str, int]:
        """Agents connected to each live replica, by its URL."""
        return {url: agents_at(url) for proc, url in self.cluster.replicas if proc.alive()}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, own_database: str, prefix: str, llama: str) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("cluster")
    cluster = cluster_script.start(
        workdir,
        own_database,
        redis_url(),
        3,
        prefix=prefix,
        drain_notice_seconds="4",  # HAProxy's checks (1 s, 2 misses) notice well before refusals
        drain_timeout="20",
        instance_lease_seconds="2",  # a killed replica's credit leases are released after 2 s
        hold_sweep_interval="0.5",
        public_rpm="100000",  # the tests poll the public routes, all from 127.0.0.1
    )
    agents: list[localpool.Proc] = []
    try:
        env = cluster.env
        (key,) = in_thread(new_consumer(env["POOL_DATABASE_URL"], "cluster@example.com", "50"))
        token = localpool.admin(env, "create-agent-token", "--email", "cluster@example.com")
        for n in (1, 2):
            agents.append(
                localpool.start_agent(cluster.url, token, llama, [SLUG], workdir, name=f"agent-{n}", max_concurrency=2)
            )
        running = Running(cluster, key, own_database, workdir)
        eventually(lambda: sum(running.local_agents().values()) == 2, timeout=30)
        yield running
    finally:
        for agent in agents:
            agent.stop()
        cluster.stop()


def _x_pool(reply: object) -> dict[str, str]:
    return dict((getattr(reply, "model_extra", None) or {})["x_pool"])


def test_the_sdk_through_haproxy_stream_and_not(running: Running) -> None:
    client = running.client(running.cluster.url)
    seen = set()
    for _ in range(6):  # HAProxy spreads them over the replicas
        reply = client.chat.completions.create(model=SLUG, messages=MSG, max_tokens=20)  # type: ignore[arg-type]
        assert reply.choices[0].message.content and reply.usage is not None
        seen.add(_x_pool(reply)["replica"])
    assert len(seen) >= 2, seen
    chunks = list(
        client.chat.completions.create(
            model=SLUG,
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_a_replica_without_agents_serves_through_another(running: Running) -> None:
    """Two agents, three replicas: one replica holds none, so what it serves is relayed."""
    bare = [url for url, count in running.local_agents().items() if count == 0]
    assert bare, running.local_agents()
    client = running.client(bare[0])
    reply = client.chat.completions.create(model=SLUG, messages=MSG, max_tokens=20)  # type: ignore[arg-type]
    x_pool = _x_pool(reply)
    assert reply.choices[0].message.content and x_pool["replica"] != x_pool["agent_replica"]
    chunks = list(
        client.chat.completions.create(model=SLUG, messages=MSG, max_tokens=20, stream=True)  # type: ignore[arg-type]
    )
    last = _x_pool(chunks[-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert last["replica"] != last["agent_replica"]


def test_every_replica_shows_the_same_models_and_status(running: Running) -> None:
    urls = [url for _, url in running.cluster.replicas]

    def same(path: str) -> bool:
        bodies = [httpx.get(f"{url}{path}", timeout=5).json() for url in urls]
        return all(body == bodies[0] for body in bodies)

    eventually(lambda: same("/v1/models"), timeout=5)
    eventually(lambda: same("/v1/pool/status"), timeout=5)
    models = httpx.get(f"{running.cluster.url}/v1/models", timeout=5).json()["data"]
    assert any(entry["id"] == SLUG and entry["providerCount"] == 1 for entry in models)


async def _load(url: str, key: str, seconds: float) -> list[int]:
    """Requests one after another through ``url`` for ``seconds``; their statuses."""
    statuses = []
    async with httpx.AsyncClient(timeout=60, headers={"authorization": f"Bearer {key}"}) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            body = {"model": SLUG, "messages": MSG, "max_tokens": 5}
            statuses.append((await client.post(f"{url}/v1/chat/completions", json=body)).status_code)
    return statuses


def test_sigterm_on_a_replica_loses_nothing_through_haproxy_and_moves_its_agent(running: Running) -> None:
    held = [url for url, count in running.local_agents().items() if count > 0]
    proc = next(p for p, url in running.cluster.replicas if url == held[0])

    async def scenario() -> list[int]:
        load = asyncio.create_task(_load(running.cluster.url, running.key, 12.0))
        await asyncio.sleep(1.0)
        proc.signal(signal.SIGTERM)
        return await load

    statuses = asyncio.run(scenario())
    assert statuses and set(statuses) == {200}, statuses  # HAProxy stopped sending before it refused
    eventually(lambda: not proc.alive(), timeout=30)
    eventually(lambda: sum(running.local_agents().values()) == 2, timeout=15)  # both agents elsewhere
    print(f"\nSIGTERM on a replica: {len(statuses)} requests through HAProxy, all 200; its agent moved")


def test_sigkill_on_a_replica_moves_its_agent_and_the_books_stay_whole(running: Running) -> None:
    held = [url for url, count in running.local_agents().items() if count > 0]
    proc = next(p for p, url in running.cluster.replicas if url == held[0])
    proc.popen.kill()
    killed = time.monotonic()
    proc.popen.wait(5)
    eventually(lambda: sum(running.local_agents().values()) == 2, timeout=20)  # reconnected through HAProxy
    moved = time.monotonic() - killed
    statuses = asyncio.run(_load(running.cluster.url, running.key, 3.0))
    assert statuses and set(statuses) == {200}, statuses
    eventually(lambda: asyncio.run(books_of(running.database))[0] == 0, timeout=20, interval=0.5)
    assert asyncio.run(books_of(running.database))[1] == []
    print(f"\nSIGKILL on a replica: its agent served from another {moved:.1f} s later; books balanced")
