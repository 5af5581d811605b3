"""How an agent leaves the pool: one :func:`remove_agent`, however it went.

An agent is lost when its socket closes, when it misses heartbeats (the stale sweep) or when its
token is revoked (the revocation sweep). Each path calls :func:`remove_agent`, so each does the
same steps in the same order: unregister, record evidence when the agent is at fault, fail its jobs
over, forget its token's trust once its last agent is gone, close the socket, log.
"""

from __future__ import annotations

import logging

from coordinator.market.registry import ConnectedAgent
from coordinator.services.state import PoolState

log = logging.getLogger(__name__)


def remove_agent(
    pool: PoolState,
    agent: ConnectedAgent,
    reason: str,
    close_code: int | None = None,
    *,
    evidence: str | None = None,
) -> bool:
    """Lose ``agent``: ``reason`` says why (logged, and given to its jobs' failures), ``close_code``
    closes its socket (``None``: the socket is already closing), ``evidence`` is a trust evidence
    kind when the agent is at fault. ``False`` if it was already gone (another path removed it)."""
    if pool.registry.remove(agent.agent_id) is not agent:
        return False
    if evidence is not None:
        pool.trust.witness(agent, evidence, reason)
    pool.dispatcher.agent_lost(agent, reason)
    if agent.local:
        pool.offer_log.ended(agent)
    if not pool.registry.of_token(agent.token_id, local=True):  # another replica's copy keeps no standing here
        pool.trust.forget(agent.token_id)
    if close_code is not None:
        agent.link.close_soon(close_code, reason)
    log.info("agent disconnected", extra={"agent_id": agent.agent_id, "reason": reason})
    return True
