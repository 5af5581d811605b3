"""Periodic sweeps (APScheduler): drop agents that stopped heartbeating."""

from __future__ import annotations

import asyncio
import logging
import time

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from coordinator.routes.agent_ws import CLOSE_STALE
from coordinator.state import PoolState

log = logging.getLogger(__name__)
_closing: set[asyncio.Future[None]] = set()


async def drop_stale_agents(pool: PoolState) -> int:
    """Remove agents silent for longer than the allowed heartbeat misses; fail over their jobs."""
    horizon = time.monotonic() - pool.settings.stale_after
    stale = pool.registry.stale(horizon)
    for agent in stale:
        if pool.registry.remove(agent.agent_id) is agent:
            log.warning("agent missed heartbeats, dropping", extra={"agent_id": agent.agent_id})
            pool.dispatcher.agent_lost(agent, "missed heartbeats")
            # Closing may wait for a handshake the silent agent never sends; do not hold up the sweep.
            task = asyncio.ensure_future(agent.link.close(CLOSE_STALE, "missed heartbeats"))
            _closing.add(task)
            task.add_done_callback(_closing.discard)
    return len(stale)


def scheduler(pool: PoolState) -> AsyncIOScheduler:
    sched = AsyncIOScheduler()
    interval = max(0.2, pool.settings.heartbeat_interval / 2)
    sched.add_job(drop_stale_agents, "interval", seconds=interval, args=[pool], max_instances=1, coalesce=True)
    return sched
