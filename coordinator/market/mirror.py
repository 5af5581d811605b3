"""The agent mirror: with replicas, every replica's registry holds the whole pool.

Each replica publishes a :class:`Card` per agent connected to it — models, prices, free slots, trust,
speed — into a Redis hash of its own (``{prefix}agents:{replica}``), and announces changes on one
channel (``{prefix}agents``) as :class:`Update` messages. Every other replica applies them to its
:class:`~coordinator.market.registry.Registry` as remote agents (``replica`` set), so placement stays
an in-memory choice with no Redis round trip on the hot path.

What keeps the copies true without consensus:

- Changes are coalesced: an agent that changes many times in ``FLUSH`` seconds is sent once.
- Every ``BEAT`` seconds a replica sends an empty update with its agent count and refreshes its
  hash's TTL. A mirror whose count for that replica differs (a lost message) reads the hash again.
- A replica whose beats stop for ``TTL`` seconds (killed, or cut off) leaves every mirror with its
  agents; their jobs here fail over (``lost``).
- After the listener (re)subscribes — start, Redis back — a replica writes its own hash anew and
  reads everyone else's.

An idle agent costs its card in Redis and no messages: beats are per replica, not per agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec
from redis.exceptions import RedisError

from coordinator.core.cluster import Cluster
from coordinator.market.registry import AgentLink, ConnectedAgent, Performance, Registry
from shared.protocol import ModelOffer

log = logging.getLogger(__name__)

FLUSH = 0.05  # seconds changes wait to be sent together
BEAT = 1.0  # seconds between a replica's beats
TTL = 5.0  # seconds without a beat after which a replica's agents leave the mirrors
FORGOTTEN = 3600.0  # seconds a replica that stopped beating stays listed in Redis before it is pruned


class Card(msgspec.Struct, array_like=True):
    """One agent as its replica publishes it: what placement and the public views read."""

    agent_id: str
    user_id: int
    token_id: int
    models: list[ModelOffer]
    max_concurrency: int
    in_flight: int
    token_in_flight: int  # its token's jobs on that replica (the new-agent cap counts them together)
    draining: bool
    trust: float
    concurrency_cap: int | None
    performance: dict[str, tuple[float | None, float | None]]  # slug -> (ttft ms, tokens/s)
    version: int  # the publishing replica's counter: an older card never overwrites a newer one
    since: float = 0.0  # when the agent connected (unix seconds): the price board's ``updated_at``


class Update(msgspec.Struct, array_like=True):
    """Cards that changed and agents that left one replica; ``count``: its agents now."""

    replica: str
    cards: list[Card]
    gone: list[str]
    count: int


_card_decoder = msgspec.msgpack.Decoder(Card)
_update_decoder = msgspec.msgpack.Decoder(Update)
_encoder = msgspec.msgpack.Encoder()

LinkFactory = Callable[[str, str], AgentLink]  # (replica, agent id) -> how to reach it through its replica
Lost = Callable[[ConnectedAgent, str], None]  # a remote agent left: fail what runs on it here
Gone = Callable[[str], None]  # a replica left every mirror (killed, cut off, or shut down)


def _gist(card: Card) -> tuple[object, ...]:
    """What other replicas need to know changed: a card differing only in trust's second decimal
    (scores decay continuously) or in the speed's noise is not worth a message."""
    performance = tuple(
        sorted(
            (slug, None if t is None else round(t), None if s is None else round(s, 1))
            for slug, (t, s) in card.performance.items()
        )
    )
    return (
        card.in_flight,
        card.token_in_flight,
        card.draining,
        round(card.trust, 1),
        card.concurrency_cap,
        performance,
    )


def card_of(agent: ConnectedAgent, version: int) -> Card:
    return Card(
        agent_id=agent.agent_id,
        user_id=agent.user_id,
        token_id=agent.token_id,
        models=list(agent.models.values()),
        max_concurrency=agent.max_concurrency,
        in_flight=agent.in_flight,
        token_in_flight=agent.share.in_flight,
        draining=agent.draining,
        trust=agent.trust,
        concurrency_cap=agent.concurrency_cap,
        performance={slug: (p.ttft_ms, p.tokens_per_s) for slug, p in agent.performance.items()},
        version=version,
        since=agent.since,
    )


class Mirror:
    """Publishes this replica's agents and keeps the other replicas' in the registry."""

    def __init__(
        self, cluster: Cluster, registry: Registry, replica: str, link: LinkFactory, lost: Lost, *, ttl: float = TTL
    ) -> None:
        self.cluster = cluster
        self.registry = registry
        self.replica = replica
        self.ttl = ttl
        self._link = link
        self._lost = lost
        self._version = 0
        self._dirty: set[str] = set()
        self._left: set[str] = set()  # local agents gone since the last write
        self._wake = asyncio.Event()
        self._published: dict[str, tuple[object, ...]] = {}  # this replica's agents in its hash: their gist
        self._beats: dict[str, float] = {}  # replica -> monotonic time of its last message
        self._versions: dict[str, int] = {}  # remote agent id -> version of the card applied
        self._by_replica: dict[str, set[str]] = {}  # replica -> the ids of its agents mirrored here
        self._removed: dict[str, float] = {}  # agents gone (ids are never reused): an older read won't bring them back
        self._unhealthy_since: float | None = None
        self._reloading: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._gone: list[Gone] = []

    @property
    def channel(self) -> str:
        return self.cluster.key("agents")

    def hash_of(self, replica: str) -> str:
        return self.cluster.key("agents", replica)

    @property
    def replicas_key(self) -> str:
        return self.cluster.key("replicas")

    def on_gone(self, callback: Gone) -> None:
        self._gone.append(callback)

    def start(self) -> None:
        self.registry.listener = self._changed
        self.cluster.listen(self.channel, self._received)
        self.cluster.on_connected(self.resync)
        self._tasks = [asyncio.create_task(self._publish()), asyncio.create_task(self._beat())]

    async def close(self) -> None:
        """Leave every mirror now (a drained replica), rather than after the TTL."""
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.registry.listener = None
        client = self.cluster.client
        if client is None or not self.cluster.healthy:
            return
        with contextlib.suppress(RedisError, OSError):
            async with client.pipeline(transaction=False) as pipe:
                pipe.delete(self.hash_of(self.replica))
                pipe.zrem(self.replicas_key, self.replica)
                pipe.publish(self.channel, _encoder.encode(Update(self.replica, [], [], -1)))
                await pipe.execute()

    # --- this replica's agents --------------------------------------------------------------

    def _changed(self, agent: ConnectedAgent, left: bool) -> None:
        if left:
            self._dirty.discard(agent.agent_id)
            self._left.add(agent.agent_id)
        else:
            self._dirty.add(agent.agent_id)
        self._wake.set()

    async def _publish(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH)
            self._wake.clear()
            dirty, left = self._dirty, self._left
            self._dirty, self._left = set(), set()
            cards = [card_of(a, self._next()) for i in dirty if (a := self.registry.get(i)) is not None and a.local]
            cards = [card for card in cards if self._published.get(card.agent_id) != _gist(card)]
            if not (cards or left):
                continue
            if not await self._write(cards, sorted(left)):
                self._dirty |= {card.agent_id for card in cards}  # sent again with the resync
                self._left |= left

    def _next(self) -> int:
        self._version += 1
        return self._version

    async def _write(self, cards: list[Card], gone: list[str], *, fresh: bool = False) -> bool:
        """Store ``cards`` in this replica's hash, drop ``gone``, and announce both (``fresh``:
        the hash is written anew, as after Redis lost it)."""
        client = self.cluster.client
        if client is None or not self.cluster.healthy:
            return False
        key = self.hash_of(self.replica)
        published = {} if fresh else dict(self._published)
        published.update((card.agent_id, _gist(card)) for card in cards)
        for agent_id in gone:
            published.pop(agent_id, None)
        now = time.time()
        try:
            async with client.pipeline(transaction=False) as pipe:
                if fresh:
                    pipe.delete(key)
                if cards:
                    pipe.hset(key, mapping={card.agent_id: _encoder.encode(card) for card in cards})
                if gone:
                    pipe.hdel(key, *gone)
                pipe.pexpire(key, int(self.ttl * 1000))
                pipe.zadd(self.replicas_key, {self.replica: now})
                pipe.zremrangebyscore(self.replicas_key, "-inf", now - FORGOTTEN)
                pipe.publish(self.channel, _encoder.encode(Update(self.replica, cards, gone, len(published))))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.cluster.failed(exc)
            return False
        self._published = published
        return True

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(BEAT)
            if self.cluster.subscribed.is_set():  # a replica that cannot hear its jobs does not say it is there
                await self._write([], [])
            self._expire()

    async def resync(self) -> None:
        """Write this replica's agents anew and read every other replica's (messages were lost)."""
        cards = [card_of(agent, self._next()) for agent in self.registry.local()]
        await self._write(cards, [], fresh=True)
        for replica in await self.alive():
            if replica != self.replica:
                await self._reload(replica)

    async def alive(self, within: float | None = None) -> list[str]:
        """The replicas that wrote their agents within ``within`` seconds (default: the TTL),
        this one included; empty if Redis does not answer."""
        client = self.cluster.client
        if client is None:
            return []
        since = time.time() - (self.ttl if within is None else within)
        try:
            names = await client.zrangebyscore(self.replicas_key, since, "+inf")
        except (RedisError, OSError) as exc:
            self.cluster.failed(exc)
            return []
        return [name.decode() if isinstance(name, bytes) else str(name) for name in names]

    # --- the other replicas' agents ---------------------------------------------------------

    def _received(self, data: bytes) -> None:
        update = _update_decoder.decode(data)
        if update.replica == self.replica:
            return
        if update.count < 0:  # it left on purpose
            self._forget(update.replica, "its coordinator shut down")
            return
        self._beats[update.replica] = time.monotonic()
        for card in update.cards:
            self._apply(update.replica, card)
        for agent_id in update.gone:
            self._remove(agent_id, update.replica, "disconnected")
        if update.count != self.mirrored(update.replica) and update.replica not in self._reloading:
            task = asyncio.create_task(self._reload(update.replica))  # a message was lost: read its hash
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    def mirrored(self, replica: str) -> int:
        return len(self._by_replica.get(replica, ()))

    async def _reload(self, replica: str) -> None:
        client = self.cluster.client
        assert client is not None
        self._reloading.add(replica)
        try:
            stored = await client.hgetall(self.hash_of(replica))
        except (RedisError, OSError) as exc:
            self.cluster.failed(exc)
            return
        finally:
            self._reloading.discard(replica)
        cards = [_card_decoder.decode(raw) for raw in stored.values() if isinstance(raw, bytes)]
        newest = max((card.version for card in cards), default=0)
        for card in cards:
            self._apply(replica, card)
        present = {card.agent_id for card in cards}
        for agent_id in list(self._by_replica.get(replica, ())):
            if agent_id not in present and self._versions.get(agent_id, 0) <= newest:  # not announced after the read
                self._remove(agent_id, replica, "disconnected")
        if cards:
            self._beats.setdefault(replica, time.monotonic())

    def _apply(self, replica: str, card: Card) -> None:
        agent = self.registry.get(card.agent_id)
        if agent is not None and agent.replica != replica:
            return  # not that replica's to speak for (an id it does not hold)
        if card.version < self._versions.get(card.agent_id, 0) or card.agent_id in self._removed:
            return
        self._versions[card.agent_id] = card.version
        self._by_replica.setdefault(replica, set()).add(card.agent_id)
        if agent is None:
            agent = ConnectedAgent(
                agent_id=card.agent_id,
                user_id=card.user_id,
                token_id=card.token_id,
                models={offer.slug: offer for offer in card.models},
                max_concurrency=card.max_concurrency,
                link=self._link(replica, card.agent_id),
                last_seen=time.monotonic(),
                replica=replica,
                since=card.since,
            )
            self.registry.add(agent)  # first: it may join a TokenShare its copy then updates
        place, agent.watcher = agent.watcher, None  # move it in the indexes once, not per field
        _copy(agent, card)
        agent.watcher = place
        share_watcher, agent.share.watcher = agent.share.watcher, None
        agent.share.in_flight = card.token_in_flight
        agent.share.watcher = share_watcher
        if place is not None:
            place()

    def _remove(self, agent_id: str, replica: str, reason: str) -> None:
        agent = self.registry.get(agent_id)
        if agent is None or agent.replica != replica:
            return
        self.registry.remove(agent_id)
        self._versions.pop(agent_id, None)
        self._removed[agent_id] = time.monotonic()
        if (mirrored := self._by_replica.get(replica)) is not None:
            mirrored.discard(agent_id)
            if not mirrored:
                del self._by_replica[replica]
        self._lost(agent, reason)

    def _forget(self, replica: str, reason: str) -> None:
        self._beats.pop(replica, None)
        for agent_id in list(self._by_replica.get(replica, ())):
            self._remove(agent_id, replica, reason)
        for callback in self._gone:
            callback(replica)

    def _expire(self) -> None:
        """Drop the agents of replicas silent for longer than the TTL (killed, or cut off)."""
        now = time.monotonic()
        horizon = now - self.ttl
        for replica, at in list(self._beats.items()):
            if at < horizon:
                log.warning("replica silent, its agents leave the mirror", extra={"replica": replica})
                self._forget(replica, "its coordinator stopped answering")
        for agent_id, at in list(self._removed.items()):
            if at < now - 2 * self.ttl:  # no read begun before it left is still on its way
                del self._removed[agent_id]
        # Redis away for longer than the TTL: nobody's copy can be kept true, nor a job relayed (a
        # shorter trouble, a slow call, leaves the pool as it is)
        if self.cluster.healthy:
            self._unhealthy_since = None
        elif self._unhealthy_since is None:
            self._unhealthy_since = now
        elif now - self._unhealthy_since > self.ttl:
            for replica in list(self._by_replica):
                self._forget(replica, "redis unavailable")


def _copy(agent: ConnectedAgent, card: Card) -> None:
    agent.in_flight = card.in_flight
    agent.draining = card.draining
    agent.trust = card.trust
    agent.concurrency_cap = card.concurrency_cap
    agent.last_seen = time.monotonic()
    for slug, (ttft_ms, tokens_per_s) in card.performance.items():
        agent.share.performance[slug] = Performance(ttft_ms, tokens_per_s)
