"""Connected agents, their models and free slots. Pure state: no I/O."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from shared.protocol import Message, ModelOffer


class AgentLink(Protocol):
    """How the coordinator talks to one agent's socket."""

    def send(self, message: Message) -> Awaitable[None]: ...

    def close(self, code: int, reason: str) -> Awaitable[None]: ...


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

    @property
    def free_slots(self) -> int:
        return 0 if self.draining else max(0, self.max_concurrency - self.in_flight)


class Registry:
    def __init__(self) -> None:
        self._agents: dict[str, ConnectedAgent] = {}

    def add(self, agent: ConnectedAgent) -> None:
        self._agents[agent.agent_id] = agent

    def remove(self, agent_id: str) -> ConnectedAgent | None:
        return self._agents.pop(agent_id, None)

    def get(self, agent_id: str) -> ConnectedAgent | None:
        return self._agents.get(agent_id)

    def agents(self) -> list[ConnectedAgent]:
        return list(self._agents.values())

    def __len__(self) -> int:
        return len(self._agents)

    def serving(self, slug: str) -> list[ConnectedAgent]:
        """Agents announcing ``slug`` (draining ones included)."""
        return [agent for agent in self._agents.values() if slug in agent.models]

    def slugs(self) -> set[str]:
        return {slug for agent in self._agents.values() for slug in agent.models}

    def stale(self, older_than: float) -> list[ConnectedAgent]:
        """Agents whose last message is older than ``older_than`` (a monotonic time)."""
        return [agent for agent in self._agents.values() if agent.last_seen < older_than]
