"""The agent mirror on a real Redis: two replicas' mirrors in one event loop, each with its own
registry and Redis connections, as two processes would have them. An agent connected to A appears
in B's registry (and placement's index) with what places it, follows A's changes, leaves when it
disconnects, comes back after a lost message, and leaves with its replica (killed: after the TTL;
shut down: at once)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import pytest

from coordinator.core.cluster import Cluster
from coordinator.market import mirror as mirror_module
from coordinator.market.mirror import Mirror
from coordinator.market.registry import ConnectedAgent, Registry
from shared.protocol import Message, ModelOffer
from tests.conftest import redis_url
from tests.waiting import eventually_async

SLUG = "smollm2-135m"


class NoSocket:
    """A local agent's link: the mirror never talks to local agents, so any use is a failure."""

    def send(self, message: Message) -> Awaitable[None]:
        raise AssertionError("the mirror sent to an agent")

    def close(self, code: int, reason: str) -> Awaitable[None]:
        raise AssertionError("the mirror closed an agent")

    def close_soon(self, code: int, reason: str) -> None:
        raise AssertionError("the mirror closed an agent")


@dataclass
class Replica:
    name: str
    cluster: Cluster
    registry: Registry
    mirror: Mirror
    lost: list[tuple[str, str]] = field(default_factory=list)


async def _replica(name: str, prefix: str, ttl: float) -> Replica:
    cluster = Cluster(redis_url(), prefix)
    registry = Registry()
    lost: list[tuple[str, str]] = []
    mirror = Mirror(
        cluster,
        registry,
        name,
        lambda replica, agent_id: NoSocket(),
        lambda agent, reason: lost.append((agent.agent_id, reason)),
        ttl=ttl,
    )
    mirror.start()
    cluster.start()
    await asyncio.wait_for(cluster.subscribed.wait(), 5)
    return Replica(name, cluster, registry, mirror, lost)


@pytest.fixture
async def pair(prefix: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Replica, Replica]]:
    monkeypatch.setattr(mirror_module, "BEAT", 0.2)
    own = f"{prefix}{time.monotonic_ns()}:"
    a = await _replica("a", own, ttl=1.0)
    b = await _replica("b", own, ttl=1.0)
    try:
        yield a, b
    finally:
        for replica in (a, b):
            await replica.mirror.close()
            await replica.cluster.close()


def _agent(agent_id: str, *, max_concurrency: int = 2, price_in: int = 100) -> ConnectedAgent:
    return ConnectedAgent(
        agent_id=agent_id,
        user_id=7,
        token_id=11,
        models={SLUG: ModelOffer(SLUG, "smol.gguf", price_in, 200, 8192, "Q4_K_M")},
        max_concurrency=max_concurrency,
        link=NoSocket(),
        last_seen=time.monotonic(),
    )


async def test_an_agent_on_a_is_in_bs_registry_and_follows_its_changes(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.registry.add(_agent("ag_1"))
    await eventually_async(lambda: b.registry.get("ag_1") is not None, timeout=3.0, interval=0.01)
    copy = b.registry.get("ag_1")
    assert copy is not None and copy.replica == "a" and not copy.local
    assert copy.models[SLUG].price_in == 100 and copy.models[SLUG].quantization == "Q4_K_M"
    assert copy.free_slots == 2 and copy.trust == 100.0
    index = b.registry.index(SLUG)
    assert index is not None and "ag_1" in index.open  # placement sees it
    assert b.registry.local() == [] and a.registry.get("ag_1") is not None

    agent = a.registry.get("ag_1")
    assert agent is not None
    agent.in_flight = 2  # full now
    agent.trust = 42.0
    await eventually_async(lambda: copy.in_flight == 2 and copy.trust == 42.0, timeout=3.0, interval=0.01)
    assert "ag_1" not in index.open  # no free slot: out of placement's index
    agent.in_flight = 1
    await eventually_async(lambda: "ag_1" in index.open, timeout=3.0, interval=0.01)

    a.registry.remove("ag_1")
    await eventually_async(lambda: b.registry.get("ag_1") is None, timeout=3.0, interval=0.01)
    assert b.lost == [("ag_1", "disconnected")]  # its jobs on B fail over


async def test_a_lost_message_is_made_good_by_the_next_beat(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    listener = b.cluster._channels[b.mirror.channel]
    missed: list[bytes] = []

    def deaf_once(data: bytes) -> None:  # B misses the update with the card, as over a connection that dropped
        if not missed and mirror_module._update_decoder.decode(data).cards:
            missed.append(data)
            return
        listener(data)

    b.cluster._channels[b.mirror.channel] = deaf_once
    a.registry.add(_agent("ag_2"))
    await eventually_async(lambda: bool(missed), timeout=3.0, interval=0.01)
    assert b.registry.get("ag_2") is None
    await eventually_async(
        lambda: b.registry.get("ag_2") is not None, timeout=2.0, interval=0.01
    )  # the count differed: B read A's hash


async def test_a_silent_replica_leaves_the_mirrors_after_the_ttl(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.registry.add(_agent("ag_3"))
    await eventually_async(lambda: b.registry.get("ag_3") is not None, timeout=3.0, interval=0.01)
    for task in a.mirror._tasks:  # A stops beating, as a killed process does (no goodbye)
        task.cancel()
    a.registry.listener = None
    stopped = time.monotonic()
    await eventually_async(lambda: b.registry.get("ag_3") is None, timeout=3.0, interval=0.01)
    assert 0.8 <= time.monotonic() - stopped <= 2.5  # the TTL (1 s) and a beat, no sooner
    assert b.lost and b.lost[-1][0] == "ag_3"


async def test_a_replica_shutting_down_leaves_at_once(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    a.registry.add(_agent("ag_4"))
    await eventually_async(lambda: b.registry.get("ag_4") is not None, timeout=3.0, interval=0.01)
    await a.mirror.close()
    await eventually_async(lambda: b.registry.get("ag_4") is None, timeout=0.5, interval=0.01)


async def test_a_replica_starting_late_reads_the_pool(pair: tuple[Replica, Replica], prefix: str) -> None:
    a, b = pair
    a.registry.add(_agent("ag_5"))
    await eventually_async(lambda: b.registry.get("ag_5") is not None, timeout=3.0, interval=0.01)
    late = await _replica("late", a.cluster.prefix, ttl=1.0)
    try:
        assert late.registry.get("ag_5") is not None  # read when it subscribed, before any message
    finally:
        await late.mirror.close()
        await late.cluster.close()


async def test_a_moment_of_redis_trouble_leaves_the_mirror_as_it_is(pair: tuple[Replica, Replica]) -> None:
    """One slow call marks Redis unhealthy until the next probe; only trouble that lasts longer than
    the TTL empties the copies (then nothing could be relayed anyway)."""
    a, b = pair
    a.registry.add(_agent("ag_6"))
    await eventually_async(lambda: b.registry.get("ag_6") is not None, timeout=3.0, interval=0.01)
    b.cluster.failed(TimeoutError("a rate-limit call timed out"))
    await asyncio.sleep(0.5)  # beats and expiry checks went by meanwhile
    assert b.registry.get("ag_6") is not None and b.lost == []
    await eventually_async(lambda: b.cluster.healthy, timeout=3.0, interval=0.01)
