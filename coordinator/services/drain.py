"""Shutting a coordinator down without dropping anyone (SIGTERM).

``/readyz`` fails at once, so a load balancer stops sending; after ``POOL_DRAIN_NOTICE_SECONDS`` (its
health checks' time to notice) new chat requests get a 503 ``shutting_down``, which clients retry
elsewhere, and new agents are turned away; open requests and jobs run to their end, for up to
``POOL_DRAIN_TIMEOUT``; then every agent is closed with ``CLOSE_DRAINING``, which tells it to
reconnect at once (to another coordinator, behind the load balancer or from its list).
"""

from __future__ import annotations

import asyncio
import logging
import math

from coordinator.services.state import PoolState
from shared.protocol import CLOSE_DRAINING

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between looks at what is still running


def busy(pool: PoolState) -> int:
    """Requests holding credit and jobs on agents that have not ended."""
    return pool.leases.running + len(pool.dispatcher.table)


async def drain(pool: PoolState) -> bool:
    """Drain as the module says; whether everything open ended in time."""
    settings = pool.settings
    pool.draining = True
    log.info("draining", extra={"notice_s": settings.drain_notice_seconds, "open": busy(pool)})
    await asyncio.sleep(settings.drain_notice_seconds)
    pool.refusing = True
    if pool.mirror is not None:  # no new jobs for them from other replicas either (the mirror tells them)
        for agent in pool.registry.local():
            agent.draining = True
    for _ in range(math.ceil(settings.drain_timeout / POLL)):  # what runs is spread over many parts: look
        if not busy(pool):
            break
        await asyncio.sleep(POLL)
    left = busy(pool)
    if left:
        log.warning("drain timeout: requests still open", extra={"open": left})
    agents = pool.registry.local()
    await asyncio.gather(
        *(agent.link.close(CLOSE_DRAINING, "coordinator draining: reconnect now") for agent in agents),
        return_exceptions=True,
    )
    log.info("drained", extra={"agents_closed": len(agents), "open": left})
    return not left
