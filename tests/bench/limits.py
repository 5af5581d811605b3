"""What a pool-wide rate limit costs a request: ``PoolKeyLimits.admit`` alone (buckets in memory)
and with Redis (one script call), beside a bare Redis ``PING`` in the same run (the floor any
round trip pays), at concurrency 1 and with 32 requests at once.

``python -m tests.bench.limits [--redis redis://127.0.0.1:6379/0] [--rounds 5000]``
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable

from coordinator.core.cluster import Cluster
from coordinator.core.ratelimit import KeyLimits, PoolKeyLimits


async def timed(call: Callable[[], Awaitable[object]], rounds: int, concurrency: int) -> tuple[float, float]:
    """(p50, p99) microseconds per call, ``concurrency`` calls in flight at a time."""
    samples: list[float] = []

    async def one() -> None:
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)

    for _ in range(rounds // concurrency):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=5000)
    args = parser.parse_args()
    prefix = f"bench-{secrets.token_hex(3)}:"
    alone = PoolKeyLimits(KeyLimits(10**9, 10**12), Cluster(None))
    cluster = Cluster(args.redis, prefix)
    shared = PoolKeyLimits(KeyLimits(10**9, 10**12), cluster)
    assert cluster.client is not None
    client = cluster.client
    try:
        for limits in (alone, shared):  # warm up: connections, the script's load
            for _ in range(200):
                await limits.admit(1, 100)
        print("per request, microseconds  |   c=1 p50      p99 |  c=32 p50      p99")
        rows = {
            "admit, in memory": lambda: alone.admit(1, 100),
            "admit, Redis script": lambda: shared.admit(1, 100),
            "Redis PING (floor)": client.ping,
        }
        for name, call in rows.items():
            one = await timed(call, args.rounds, 1)
            many = await timed(call, args.rounds, 32)
            print(f"{name:<26} | {one[0]:>9.1f} {one[1]:>8.1f} | {many[0]:>9.1f} {many[1]:>8.1f}")
        print(f"redis errors: {cluster.errors}")
    finally:
        async for key in client.scan_iter(f"{prefix}*"):
            await client.delete(key)
        await cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
