"""However an agent is lost, :func:`coordinator.services.presence.remove_agent` takes the same steps (no
sockets: the job table and the trust book in memory, a link that records what it was told)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from coordinator.market.registry import ConnectedAgent, Registry
from coordinator.market.upstream import Upstream
from coordinator.services.presence import remove_agent
from coordinator.serving.dispatch import Dispatcher
from coordinator.status.offerlog import OfferLog
from coordinator.trust import scores as trust
from coordinator.trust.scores import Reputation, TrustBook
from shared import errors
from shared.backend import Failure
from shared.protocol import CLOSE_REVOKED, CLOSE_STALE, ModelOffer

TOKEN, PROVIDER = 70, 7


class Link:
    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    async def send(self, message: object) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def close_soon(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


def agent(agent_id: str, link: Link) -> ConnectedAgent:
    return ConnectedAgent(agent_id, PROVIDER, TOKEN, {"m": ModelOffer("m", "m", 1, 1)}, 4, link, 0.0)


async def test_every_way_to_lose_an_agent_takes_the_same_steps() -> None:
    registry = Registry()
    book = TrustBook(engine=None, half_life=3600.0, new_agent_concurrency=2)  # type: ignore[arg-type]
    dispatcher = Dispatcher(registry, Upstream(None, None, {}, 5.0), 5.0, 60.0, trust=book)
    offers = OfferLog(None, "crd_test", retention_days=1, lease_seconds=30)  # type: ignore[arg-type]  # queues only
    pool: Any = SimpleNamespace(registry=registry, dispatcher=dispatcher, trust=book, offer_log=offers)
    frozen_link, revoked_link = Link(), Link()
    frozen, revoked = agent("agt_a", frozen_link), agent("agt_b", revoked_link)  # one token, two machines
    registry.add(frozen)
    registry.add(revoked)
    book.reputations[TOKEN] = Reputation()  # as loaded when they connected
    job = await dispatcher.assign(frozen, "m", b"{}", stream=True, want_usage=False)

    # Missed heartbeats: evidence against it, its job fails over, its socket is closed.
    assert remove_agent(pool, frozen, "missed heartbeats", CLOSE_STALE, evidence=trust.HEARTBEAT_MISSED)
    (event,) = job.ready()
    assert isinstance(event, Failure) and event.code == errors.AGENT_LOST and "missed heartbeats" in event.message
    assert [e.kind for e in book.pending] == [trust.HEARTBEAT_MISSED]
    assert frozen_link.closed == [(CLOSE_STALE, "missed heartbeats")]
    assert TOKEN in book.reputations  # its token still has an agent here: its trust stays loaded
    assert frozen.in_flight == 0 and registry.get("agt_a") is None

    # The socket's own end comes later: the agent is gone already, nothing happens twice.
    assert not remove_agent(pool, frozen, "connection closed")
    assert frozen_link.closed == [(CLOSE_STALE, "missed heartbeats")] and len(book.pending) == 1

    # Revoked: no evidence (not the agent's fault); the token's last agent, so its trust is forgotten.
    assert remove_agent(pool, revoked, "agent token revoked", CLOSE_REVOKED)
    assert revoked_link.closed == [(CLOSE_REVOKED, "agent token revoked")]
    assert len(book.pending) == 1 and TOKEN not in book.reputations
    assert len(registry) == 0 and registry.of_token(TOKEN) == 0
    assert [event[:2] for event in offers._queue] == [("agt_a", "m"), ("agt_b", "m")]  # their offers end, once each
