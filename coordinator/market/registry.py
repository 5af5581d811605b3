"""Connected agents, their models and free slots. Pure state: no I/O.

With replicas the registry also holds the agents connected to other replicas (``replica`` set),
as the mirror (:mod:`coordinator.market.mirror`) copies them from Redis: placement, ``/v1/models``
and the status page see the whole pool. This process is the authority on its own agents only."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from coordinator.market.index import ModelIndex
from shared.protocol import Message, ModelOffer


class AgentLink(Protocol):
    """How the coordinator talks to one agent's socket."""

    def send(self, message: Message) -> Awaitable[None]: ...

    def close(self, code: int, reason: str) -> Awaitable[None]: ...

    def close_soon(self, code: int, reason: str) -> None: ...


EMA_WEIGHT = 0.2  # weight of the newest observation in the moving averages


@dataclass
class Performance:
    """Moving averages of what one agent showed on one model: time to first token (streams) and
    generation speed."""

    ttft_ms: float | None = None
    tokens_per_s: float | None = None

    def observe(self, ttft_ms: float | None, tokens_per_s: float | None) -> None:
        if ttft_ms is not None:
            self.ttft_ms = _ema(self.ttft_ms, ttft_ms)
        if tokens_per_s is not None:
            self.tokens_per_s = _ema(self.tokens_per_s, tokens_per_s)


def observe(
    agent: ConnectedAgent, slug: str, completion_tokens: int, *, assigned_at: float, first_at: float, stream: bool
) -> tuple[float | None, float | None]:
    """Feed a completed job's timings (``perf_counter`` times) into its agent token's moving
    averages for the model: time to first token (streams only: a non-stream reply arrives whole)
    and generation speed. Returns what was observed (ms, tokens/s)."""
    now = time.perf_counter()
    ttft_ms: float | None = None
    if stream:
        generating = now - first_at
        speed = (completion_tokens - 1) / generating if completion_tokens > 1 and generating > 0 else None
        ttft_ms = (first_at - assigned_at) * 1000
    else:
        total = now - assigned_at
        speed = completion_tokens / total if completion_tokens > 0 and total > 0 else None
    agent.performance.setdefault(slug, Performance()).observe(ttft_ms, speed)
    agent.share.changed()
    return ttft_ms, speed


def _ema(average: float | None, value: float) -> float:
    return value if average is None else average + EMA_WEIGHT * (value - average)


Watcher = Callable[[], None]
Listener = Callable[["ConnectedAgent", bool], None]  # a local agent changed (``True``: it left)

# What decides whether an agent can take a job, and where placement's indexes put it: setting one
# of these tells the registry (``watcher``), which moves the agent in its model indexes.
_PLACED = frozenset({"in_flight", "draining", "trust", "concurrency_cap"})


@dataclass(eq=False)
class TokenShare:
    """What the agents of one agent token share: one token is one identity, however many sockets
    it opens, so the new-agent concurrency cap counts their jobs together and their speed is
    averaged together."""

    in_flight: int = 0
    performance: dict[str, Performance] = field(default_factory=dict)
    watcher: Watcher | None = None  # the registry, for the token's agents

    def __setattr__(self, name: str, value: object) -> None:
        old = self.__dict__.get(name, value)
        object.__setattr__(self, name, value)
        if name == "in_flight" and old != value and (watcher := self.__dict__.get("watcher")) is not None:
            watcher()

    def changed(self) -> None:
        """Its averages moved (a job's timings arrived): the token's agents move in placement's orders."""
        if self.watcher is not None:
            self.watcher()


@dataclass(eq=False)
class ConnectedAgent:
    agent_id: str
    user_id: int
    token_id: int
    models: dict[str, ModelOffer]
    max_concurrency: int
    link: AgentLink
    last_seen: float
    in_flight: int = 0
    draining: bool = False
    jobs: set[str] = field(default_factory=set)
    trust: float = 100.0
    concurrency_cap: int | None = None  # fewer consumer jobs at once (all its token's agents) while new
    share: TokenShare = field(default_factory=TokenShare)
    seq: int = 0  # the order it was registered in (the registry's)
    watcher: Watcher | None = None  # the registry, while registered
    replica: str | None = None  # the replica it is connected to, when that is another one (a mirror copy)
    since: float = 0.0  # when it connected (unix seconds): its prices were set then

    def __setattr__(self, name: str, value: object) -> None:
        old = self.__dict__.get(name, value)
        object.__setattr__(self, name, value)
        if name in _PLACED and old != value and (watcher := self.__dict__.get("watcher")) is not None:
            watcher()  # (an unchanged value moves nothing: the trust sweep sets every agent's often)

    @property
    def performance(self) -> dict[str, Performance]:
        """Moving averages per model, shared by the token's agents."""
        return self.share.performance

    @property
    def local(self) -> bool:
        """Connected to this process (not a mirror copy of another replica's agent)."""
        return self.replica is None

    @property
    def provider_id(self) -> str:
        """How consumers name the agent's provider (``x_pool.provider``, ``provider.only`` …)."""
        return str(self.user_id)

    @property
    def free_slots(self) -> int:
        if self.draining:
            return 0
        own = self.max_concurrency - self.in_flight
        if self.concurrency_cap is None:
            return max(0, own)
        return max(0, min(own, self.concurrency_cap - self.share.in_flight))


class Registry:
    def __init__(self) -> None:
        self._agents: dict[str, ConnectedAgent] = {}
        self._tokens: dict[int, list[ConnectedAgent]] = {}  # agent token id -> its connected agents
        self._models: dict[str, ModelIndex] = {}  # slug -> its agents with a free slot, ordered
        self._seq = itertools.count(1)
        self.listener: Listener | None = None  # told when a local agent comes, changes or leaves

    def add(self, agent: ConnectedAgent) -> None:
        """Register ``agent``; it shares a :class:`TokenShare` with its token's other agents on the
        same replica (the replica that holds them counts their jobs together)."""
        siblings = self._tokens.setdefault(agent.token_id, [])
        for sibling in siblings:
            if sibling.replica == agent.replica:
                agent.share = sibling.share
                break
        siblings.append(agent)
        self._agents[agent.agent_id] = agent
        agent.seq = next(self._seq)
        agent.watcher = functools.partial(self._place, agent)
        token_id, replica = agent.token_id, agent.replica
        agent.share.watcher = lambda: self._place_token(token_id, replica)
        self._place(agent)

    def of_token(self, token_id: int, *, local: bool = False) -> int:
        """How many agents of this agent token are connected, to any replica (``local``: to this one)."""
        siblings = self._tokens.get(token_id, ())
        return sum(1 for agent in siblings if agent.local) if local else len(siblings)

    def changed(self, agent: ConnectedAgent) -> None:
        """Tell the listener about a local agent as it is now (the mirror publishes it again)."""
        if agent.replica is None and self.listener is not None:
            self.listener(agent, False)

    def remove(self, agent_id: str) -> ConnectedAgent | None:
        agent = self._agents.pop(agent_id, None)
        if agent is not None:
            agent.watcher = None
            for slug in agent.models:
                if (index := self._models.get(slug)) is not None:
                    index.remove(agent)
            siblings = self._tokens[agent.token_id]
            siblings.remove(agent)
            if not siblings:
                del self._tokens[agent.token_id]
            if not any(sibling.share is agent.share for sibling in siblings):
                agent.share.watcher = None
            if agent.replica is None and self.listener is not None:
                self.listener(agent, True)
        return agent

    def _place(self, agent: ConnectedAgent) -> None:
        for slug in agent.models:
            index = self._models.get(slug)
            if index is None:
                index = self._models[slug] = ModelIndex(slug)
            index.update(agent)
        if agent.replica is None and self.listener is not None:
            self.listener(agent, False)

    def _place_token(self, token_id: int, replica: str | None) -> None:
        for agent in self._tokens.get(token_id, ()):
            if agent.replica == replica:
                self._place(agent)

    def index(self, slug: str) -> ModelIndex | None:
        """``slug``'s agents with a free slot, in placement's orders."""
        return self._models.get(slug)

    def get(self, agent_id: str) -> ConnectedAgent | None:
        return self._agents.get(agent_id)

    def agents(self) -> list[ConnectedAgent]:
        """Every agent in the pool: this process's and, with replicas, the others'."""
        return list(self._agents.values())

    def local(self) -> list[ConnectedAgent]:
        """The agents connected to this process: the ones it serves, verifies, sweeps and closes."""
        return [agent for agent in self._agents.values() if agent.replica is None]

    def __len__(self) -> int:
        return len(self._agents)

    def serving(self, slug: str) -> list[ConnectedAgent]:
        """Agents announcing ``slug`` (draining ones included)."""
        return [agent for agent in self._agents.values() if slug in agent.models]

    def able(self, slug: str, trust_floor: float) -> list[ConnectedAgent]:
        """Agents that can get ``slug``'s traffic: announcing it, not draining, trusted enough
        (busy ones included: they take jobs again as theirs end)."""
        return [
            agent
            for agent in self._agents.values()
            if slug in agent.models and not agent.draining and agent.trust >= trust_floor
        ]

    def able_any(self, trust_floor: float) -> list[ConnectedAgent]:
        """Agents that can get some model's traffic (not draining, trusted enough)."""
        return [agent for agent in self._agents.values() if not agent.draining and agent.trust >= trust_floor]

    def slugs(self) -> set[str]:
        return {slug for agent in self._agents.values() for slug in agent.models}

    def stale(self, older_than: float) -> list[ConnectedAgent]:
        """Local agents whose last message is older than ``older_than`` (a monotonic time)."""
        return [agent for agent in self._agents.values() if agent.replica is None and agent.last_seen < older_than]
