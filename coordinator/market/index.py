"""For each model, the agents that can take a job now, ordered every way placement asks: by trust,
by price, by observed time to first token and by speed, and in a list to draw from at random.

The registry keeps these up to date as agents change (a job starts or ends, trust moves, an agent
drains, a job's timings arrive), so placement finds the best agent, or two at random, without
reading every agent: with every replica's agents visible, a model may have tens of thousands.
Pure state: no I/O. Orders are plain sorted lists: moving one agent costs a binary search and a
memory move, a few microseconds at 10,000 agents.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from shared.protocol import CHAT

if TYPE_CHECKING:
    from coordinator.market.registry import ConnectedAgent

MIN_SPEED = 1e-3  # tokens/s: placement counts slower agents as this slow


class Ranked:
    """Agents ordered by a number, lowest first, and among equal numbers by when they connected
    (``seq``), the order a scan of the registry meets them in."""

    def __init__(self) -> None:
        self._entries: list[tuple[float, int]] = []  # (key, seq), sorted
        self._of: dict[int, tuple[ConnectedAgent, float]] = {}  # seq -> (agent, key)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, agent: ConnectedAgent, key: float | None) -> None:
        """Place ``agent`` at ``key`` (``None``: take it out)."""
        current = self._of.get(agent.seq)
        if current is not None:
            if current[1] == key:
                return
            del self._entries[bisect.bisect_left(self._entries, (current[1], agent.seq))]
            del self._of[agent.seq]
        if key is not None:
            bisect.insort(self._entries, (key, agent.seq))
            self._of[agent.seq] = (agent, key)

    def ascending(self) -> Iterator[tuple[float, ConnectedAgent]]:
        of = self._of
        for key, seq in self._entries:
            yield key, of[seq][0]

    def descending(self) -> Iterator[tuple[float, ConnectedAgent]]:
        of = self._of
        for key, seq in reversed(self._entries):
            yield key, of[seq][0]

    def at_least(self, key: float) -> int:
        """Where the agents whose number is at least ``key`` start (they run to the end)."""
        return bisect.bisect_left(self._entries, (key, -1))

    def at(self, position: int) -> ConnectedAgent:
        return self._of[self._entries[position][1]][0]


class ModelIndex:
    """The agents of one model with a free slot (draining ones have none)."""

    def __init__(self, slug: str) -> None:
        self.slug = slug
        self.trust = Ranked()
        self.price_in = Ranked()
        self.price_out = Ranked()
        self.price = Ranked()  # input + output price: ``sort: price``
        self.ttft = Ranked()  # agents whose time to first token is known: ``sort: latency``
        self.slowness = Ranked()  # minus speed, for agents whose speed is known: ``sort: throughput``
        self.no_ttft: dict[int, ConnectedAgent] = {}  # not yet measured
        self.no_speed: dict[int, ConnectedAgent] = {}
        self.open: dict[str, ConnectedAgent] = {}  # by agent id

    def __len__(self) -> int:
        return len(self.trust)

    def update(self, agent: ConnectedAgent) -> None:
        """Index ``agent`` as it is now (or take it out: no free slot). Only chat is placed from
        the index: an offer without it is left for placement's scan of the other kinds."""
        offer = agent.models.get(self.slug)
        if offer is None or agent.free_slots <= 0 or not offer.serves(CHAT):
            self.remove(agent)
            return
        self.open[agent.agent_id] = agent
        self.trust.put(agent, agent.trust)
        self.price_in.put(agent, offer.price_in)
        self.price_out.put(agent, offer.price_out)
        self.price.put(agent, float(offer.price_in + offer.price_out))
        known = agent.performance.get(self.slug)
        ttft = known.ttft_ms if known is not None else None
        speed = known.tokens_per_s if known is not None else None
        self.ttft.put(agent, ttft)
        self.slowness.put(agent, None if speed is None else -max(MIN_SPEED, speed))
        _mark(self.no_ttft, agent, ttft is None)
        _mark(self.no_speed, agent, speed is None)

    def remove(self, agent: ConnectedAgent) -> None:
        for ranked in (self.trust, self.price_in, self.price_out, self.price, self.ttft, self.slowness):
            ranked.put(agent, None)
        self.no_ttft.pop(agent.seq, None)
        self.no_speed.pop(agent.seq, None)
        self.open.pop(agent.agent_id, None)

    def trusted(self, floor: float) -> int:
        """How many agents with a free slot score at least ``floor``."""
        return len(self.trust) - self.trust.at_least(floor)

    def draw_trusted(self, floor: float, rng: random.Random) -> ConnectedAgent:
        """One agent scoring at least ``floor``, each as likely (there must be one)."""
        start = self.trust.at_least(floor)
        return self.trust.at(start + rng.randrange(len(self.trust) - start))


def _mark(unmeasured: dict[int, ConnectedAgent], agent: ConnectedAgent, missing: bool) -> None:
    if missing:
        unmeasured[agent.seq] = agent
    else:
        unmeasured.pop(agent.seq, None)
