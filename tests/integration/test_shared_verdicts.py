"""Canary verdicts across replicas, on a real Redis: the replica that ran the canary tells every
replica's clawback (this one's too), so jobs served on replica B for an agent held by replica A are
vouched for, or refunded, by A's canaries."""

from __future__ import annotations

import asyncio
import time

from coordinator.core.cluster import Cluster
from coordinator.money.clawback import Clawback, SharedVerdicts, apply_verdict
from coordinator.money.requestlog import RequestRecord
from tests.conftest import redis_url
from tests.waiting import eventually_async


async def _replica(prefix: str) -> tuple[Cluster, Clawback]:
    cluster = Cluster(redis_url(), prefix)
    clawback = Clawback(engine=None, leases=None, confirmations=2)  # type: ignore[arg-type]
    cluster.on_push(lambda push: apply_verdict(clawback, push))
    cluster.start()
    await asyncio.wait_for(cluster.subscribed.wait(), 5)
    return cluster, clawback


def _serve(clawback: Clawback, request_id: str, agent_id: str = "agt_a") -> None:
    record = RequestRecord(id=request_id, user_id=1, key_id=None, provider_user_id=2, cost=100, provider_earned=90)
    clawback.served(7, agent_id, "m", record)


async def test_a_canary_on_one_replica_settles_the_jobs_of_every_replica(prefix: str) -> None:
    own = f"{prefix}verdicts-{time.monotonic_ns()}:"
    (a, a_clawback), (b, b_clawback) = await _replica(own), await _replica(own)
    try:
        _serve(b_clawback, "req_on_b_1")  # B's consumer, A's agent
        _serve(a_clawback, "req_on_a_1")
        verdicts = SharedVerdicts(a)  # A runs the canaries on its agent
        verdicts.vouched(7, "agt_a", "m", answered_at=time.monotonic())
        await eventually_async(
            lambda: not b_clawback.unvouched.get((7, "m")) and not a_clawback.unvouched.get((7, "m")),
            timeout=3.0,
            interval=0.01,
        )

        _serve(b_clawback, "req_on_b_2")
        verdicts.disagreed(7, "m", "digest-1")
        verdicts.disagreed(7, "m", "digest-2")  # confirmed on distinct prompts: refund everywhere
        await eventually_async(
            lambda: [job.request_id for job in b_clawback.due] == ["req_on_b_2"], timeout=3.0, interval=0.01
        )
        assert a_clawback.due == [] and (7, "m") in a_clawback.discredited_now
    finally:
        await a.close()
        await b.close()
