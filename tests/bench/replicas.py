"""What replicas cost, measured in one run: two coordinator replicas (A and B) on PostgreSQL and
Redis, one agent connected to A in front of a loopback stand-in backend.

1. Latency added over a direct call to the stand-in, at concurrency 1, rounds interleaved in random
   order: through A (same replica: the agent is A's) and through B (cross-replica: B places the job
   on its mirror copy of A's agent, A relays the agent's frames back over Redis). Non-stream p50/p99,
   time to first token p50/p99, and the gap between chunks of a paced stream (p50/p99).
2. CPU per request on each replica, for same-replica and cross-replica requests.
3. Redis per idle agent, with 1,000 and 10,000 idle agents spread over A and B (real ``pool-agent``
   connection code, many in this process): the memory of the pool's Redis keys, and the messages and
   bytes the agent channel carries per second, per agent.

    .venv/bin/python -m tests.bench.replicas [--rounds 300] [--agents 1000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import random
import secrets
import tempfile
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from provider_agent.backends import Backend
from provider_agent.config import AgentConfig, ModelSpec, coordinator_url
from provider_agent.connection import Agent
from scripts import localpool
from tests.bench import procs
from tests.bench.common import pct, pool_under_load
from tests.conftest import postgres_url, redis_url, run_sql

FAST, PACED = "smollm2-135m", "gemma-3-270m"
MSG = [{"role": "user", "content": "bench"}]
CHUNKS, PACE_MS = 20, 5.0
BATCH = 250


async def _non_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str) -> float:
    started = time.perf_counter()
    response = await client.post(url, headers=headers, json={"model": model, "messages": MSG})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def _stream(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str
) -> tuple[float, list[float]]:
    started = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", url, headers=headers, json={"model": model, "messages": MSG, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return (stamps[0] - started) * 1000, [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]


Target = tuple[str, str, dict[str, str], str, str]  # non-stream URL, stream URL, headers, their two models


async def latency(targets: dict[str, Target], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per target: non-stream times, first-token times, and the gaps between chunks (ms)."""
    results: dict[str, dict[str, list[float]]] = {name: {"ns": [], "ttft": [], "gaps": []} for name in targets}
    async with httpx.AsyncClient(timeout=60) as client:
        for url, stream_url, headers, fast, paced in targets.values():  # warm every path up
            for _ in range(20):
                await _non_stream(client, url, headers, fast)
                await _stream(client, stream_url, headers, paced)
        for _ in range(rounds):
            order = list(targets)
            random.shuffle(order)
            for name in order:
                url, stream_url, headers, fast, paced = targets[name]
                row = results[name]
                row["ns"].append(await _non_stream(client, url, headers, fast))
                ttft, gaps = await _stream(client, stream_url, headers, paced)
                row["ttft"].append(ttft)
                row["gaps"].extend(gaps)
    return results


async def cpu(target: Target, requests: int, pids: dict[str, list[int]]) -> dict[str, tuple[float, float]]:
    """CPU ms per request on each replica, non-stream and stream: ``requests`` of each in a row,
    4 at a time, less what the replica uses idle over as long (its beats, sweeps and flushes)."""
    idle = {r: procs.cpu_seconds(p) for r, p in pids.items()}
    await asyncio.sleep(3.0)
    idle_rate = {r: (procs.cpu_seconds(p) - idle[r]) / 3.0 for r, p in pids.items()}
    url, stream_url, headers, fast, paced = target
    figures: dict[str, list[float]] = {r: [] for r in pids}
    async with httpx.AsyncClient(timeout=60) as client:
        for streaming in (False, True):
            before, started = {r: procs.cpu_seconds(p) for r, p in pids.items()}, time.monotonic()

            async def worker(streaming: bool) -> None:
                for _ in range(requests // 4):
                    if streaming:
                        await _stream(client, stream_url, headers, paced)
                    else:
                        await _non_stream(client, url, headers, fast)

            await asyncio.gather(*(worker(streaming) for _ in range(4)))
            elapsed = time.monotonic() - started
            for r, p in pids.items():
                used = procs.cpu_seconds(p) - before[r] - idle_rate[r] * elapsed
                figures[r].append(1000 * max(0.0, used) / (requests // 4 * 4))
    return {r: (values[0], values[1]) for r, values in figures.items()}


def _report_latency(results: dict[str, dict[str, list[float]]], rounds: int) -> None:
    direct = results["direct"]

    def added(name: str, key: str, q: float) -> float:
        return pct(results[name][key], q) - pct(direct[key], q)

    print(f"\nadded over a direct call, concurrency 1, {rounds} interleaved rounds (ms):")
    print(f"{'':>14} | {'non-stream p50':>14} {'p99':>7} | {'TTFT p50':>9} {'p99':>7} | {'gap p50':>8} {'p99':>7}")
    for name in ("direct", "same replica", "cross replica"):
        if name == "direct":
            cells = [pct(direct[k], q) for k in ("ns", "ttft", "gaps") for q in (0.5, 0.99)]
            print(
                f"{'direct (abs)':>14} | {cells[0]:>14.2f} {cells[1]:>7.2f} | {cells[2]:>9.2f} {cells[3]:>7.2f}"
                f" | {cells[4]:>8.2f} {cells[5]:>7.2f}"
            )
            continue
        cells = [added(name, k, q) for k in ("ns", "ttft", "gaps") for q in (0.5, 0.99)]
        print(
            f"{name:>14} | {cells[0]:>+14.2f} {cells[1]:>+7.2f} | {cells[2]:>+9.2f} {cells[3]:>+7.2f}"
            f" | {cells[4]:>+8.2f} {cells[5]:>+7.2f}"
        )
    cross = [added("cross replica", k, 0.5) - added("same replica", k, 0.5) for k in ("ns", "ttft")]
    print(f"cross over same replica at p50: non-stream {cross[0]:+.2f} ms, first token {cross[1]:+.2f} ms")


async def _echo(channel: str) -> None:
    listen, send = aioredis.Redis.from_url(redis_url()), aioredis.Redis.from_url(redis_url())
    pubsub = listen.pubsub()
    await pubsub.subscribe(f"{channel}:ping")
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            await send.publish(f"{channel}:pong", message["data"])


def _run_echo(channel: str) -> None:
    asyncio.run(_echo(channel))


async def pubsub_floor(channel: str, pause: float, rounds: int = 300) -> tuple[float, float]:
    """A bare Redis pub/sub round trip between two processes (what one relayed request's two hops
    cost at the least), p50 and p99 ms, with ``pause`` seconds of idleness before each."""
    listen, send = aioredis.Redis.from_url(redis_url()), aioredis.Redis.from_url(redis_url())
    pubsub = listen.pubsub()
    await pubsub.subscribe(f"{channel}:pong")
    await asyncio.sleep(0.5)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await send.publish(f"{channel}:ping", b"x" * 300)
        while await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0) is None:
            pass
        times.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(pause)
    await pubsub.aclose()
    await listen.aclose()
    await send.aclose()
    return pct(times, 0.5), pct(times, 0.99)


def _report_floor(prefix: str) -> None:
    echo = multiprocessing.Process(target=_run_echo, args=(f"{prefix}floor",), daemon=True)
    echo.start()
    try:
        time.sleep(0.5)
        for pause in (0.0, 0.1):
            p50, p99 = asyncio.run(pubsub_floor(f"{prefix}floor", pause))
            print(
                f"bare Redis pub/sub round trip between two processes, {pause * 1000:.0f} ms idle before each: "
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
            )
    finally:
        echo.terminate()


def _report_cpu(figures: dict[str, dict[str, tuple[float, float]]]) -> None:
    print("\nCPU per request above idle, ms (non-stream / stream of 20 chunks), 4 at a time:")
    for name, replicas in figures.items():
        cells = "  ".join(f"{r} {ns:.3f} / {st:.3f}" for r, (ns, st) in replicas.items())
        print(f"{name:>14} | {cells}")


async def idle_agents(
    urls: list[str], token: str, backend_url: str, counts: list[int], prefix: str, seconds: float = 10.0
) -> None:
    """Connect idle agents spread over ``urls`` up to each count; Redis memory and agent-channel
    traffic per agent."""
    client = aioredis.Redis.from_url(redis_url())
    tasks: list[asyncio.Task[None]] = []
    configs = [
        AgentConfig(
            coordinator_url=coordinator_url(url),
            token=token,
            backend_url=f"{backend_url}/v1",
            models=(ModelSpec(FAST, "bench-idle"),),
            price_in=1,
            price_out=1,
            max_concurrency=1,
            log_level="WARNING",
        )
        for url in urls
    ]
    backend = Backend(configs[0])

    async def pool_bytes() -> int:
        total = 0
        async for key in client.scan_iter(f"{prefix}*", count=1000):
            total += int(await client.memory_usage(key) or 0)
        return total

    async def connected() -> int:
        async with httpx.AsyncClient(timeout=30) as http:
            return sum([int((await http.get(f"{url}/healthz")).json()["agents"]) for url in urls])

    print(f"\nidle agents over {len(urls)} replicas: Redis memory of the pool's keys, agent-channel traffic")
    base_agents = await connected()
    await asyncio.sleep(2)
    base_bytes = await pool_bytes()
    try:
        for count in counts:
            while len(tasks) < count:
                for _ in range(min(BATCH, count - len(tasks))):
                    config = configs[len(tasks) % len(configs)]
                    tasks.append(asyncio.create_task(Agent(config, backend).run()))
                deadline = time.monotonic() + 180
                while await connected() < base_agents + len(tasks):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{len(tasks)} agents did not all connect")
                    await asyncio.sleep(0.2)
            await asyncio.sleep(3)  # heartbeats settle; every mirror has every card
            memory = await pool_bytes() - base_bytes
            pubsub = client.pubsub()
            await pubsub.subscribe(f"{prefix}agents", *(f"{prefix}relay:*",))
            messages = size = 0
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if message is not None:
                    messages += 1
                    size += len(message["data"])
            await pubsub.aclose()
            print(
                f"{count:>7} agents | Redis {memory / count:>6.0f} bytes per agent ({memory / 1e6:.1f} MB) | "
                f"{messages / seconds:.1f} messages/s in all, {messages / seconds / count:.5f} per agent, "
                f"{size / seconds / count:.2f} bytes/s per agent",
                flush=True,
            )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await backend.aclose()
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--agents", default="1000,10000", help="idle agent counts, comma-separated")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pool-bench-replicas-"))
    name = f"bench_replicas_{secrets.token_hex(3)}"
    asyncio.run(run_sql(f"CREATE DATABASE {name}"))
    database = f"{postgres_url().rsplit('/', 1)[0]}/{name}"
    prefix = f"bench-{secrets.token_hex(3)}:"
    pool = pool_under_load(workdir, db_url=database, redis_url=redis_url(), redis_prefix=prefix)
    pool.start()
    b = None
    try:
        port = localpool.free_port()
        b = localpool.start_coordinator(port, {**pool.env, "POOL_REPLICA_NAME": "b"}, workdir, name="coordinator-b")
        b_url = f"http://127.0.0.1:{port}"
        fast = pool.standin(chunks=CHUNKS)
        paced = pool.standin(chunks=CHUNKS, interval_ms=PACE_MS)
        quiet = {"POOL_AGENT_LOG_LEVEL": "WARNING"}
        pool.agent(fast, [f"{FAST}=bench-fast"], max_concurrency=64, extra_env=quiet)
        pool.agent(paced, [f"{PACED}=bench-paced"], max_concurrency=64, extra_env=quiet)
        deadline = time.monotonic() + 15
        while {FAST, PACED} - {m["id"] for m in httpx.get(f"{b_url}/v1/models").json()["data"]}:
            if time.monotonic() > deadline:
                raise TimeoutError("B never saw A's agents")
            time.sleep(0.1)
        auth = {"authorization": f"Bearer {pool.key}"}
        assert pool.coordinator is not None
        pids = {"A": [pool.coordinator.popen.pid], "B": [b.popen.pid]}
        on_a, on_b = f"{pool.url}/v1/chat/completions", f"{b_url}/v1/chat/completions"
        targets: dict[str, Target] = {
            "direct": (f"{fast}/v1/chat/completions", f"{paced}/v1/chat/completions", {}, "bench-fast", "bench-paced"),
            "same replica": (on_a, on_a, auth, FAST, PACED),
            "cross replica": (on_b, on_b, auth, FAST, PACED),
        }
        print(f"stand-ins: {CHUNKS} chunks, streams paced {PACE_MS} ms; replicas A (holds the agent) and B")
        results = asyncio.run(latency(targets, args.rounds))
        _report_latency(results, args.rounds)
        _report_floor(prefix)
        _report_cpu({name: asyncio.run(cpu(targets[name], 400, pids)) for name in ("same replica", "cross replica")})
        counts = [int(c) for c in args.agents.split(",") if c]
        if counts:
            asyncio.run(idle_agents([pool.url, b_url], pool.token, fast, counts, prefix))
    finally:
        if b is not None:
            b.stop()
        pool.stop()
        asyncio.run(run_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


if __name__ == "__main__":
    main()
