"""Added latency of the pool beside LiteLLM's proxy and Portkey's gateway, in one run on one machine.

Four targets in front of the same loopback stand-in backend (8 chunks, no pacing): the stand-in
called directly; the pool (coordinator + one agent, credits, rate limits and the request log on,
PostgreSQL); LiteLLM's proxy; Portkey's gateway. At concurrency 1, after a warm-up, each round
sends one non-streamed and one streamed request to every target in a fresh random order; added
latency is a target's percentile minus the direct call's, for non-stream totals and stream time to
first token.

    .venv/bin/python -m tests.bench.gateways [--rounds 300] [--targets pool,litellm,portkey]

The peers install on first use under ``tests/bench/.peers/`` (see ``tests/bench/peers.py``).
Results are also written to ``tests/bench/results/gateways.json``. For experiments,
``POOL_BENCH_SETTINGS="ledger_flush_interval=60 …"`` passes coordinator settings to the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

from scripts import localpool
from tests.bench import peers
from tests.harness import Pool

MODEL = "smollm2-135m"  # a directory slug, so the pool admits the stand-in under it
BENCH_DB = "postgresql+asyncpg://postgres@127.0.0.1:5432/bench"
RESULTS = Path(__file__).parent / "results"
MSG = [{"role": "user", "content": "bench"}]


@dataclass
class Target:
    name: str
    url: str  # the chat completions endpoint
    headers: dict[str, str]
    totals: list[float] = field(default_factory=list)  # non-stream, ms
    ttfts: list[float] = field(default_factory=list)  # stream, ms


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fresh_database(url: str) -> str:
    """An empty ``bench`` database beside the test one (created if missing)."""
    plain = url.replace("postgresql+asyncpg://", "postgresql://")
    admin = await asyncpg.connect(plain.rsplit("/", 1)[0] + "/postgres", timeout=5)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = 'bench'"):
            await admin.execute("CREATE DATABASE bench")
    finally:
        await admin.close()
    conn = await asyncpg.connect(plain, timeout=5)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()
    return url


async def once(client: httpx.AsyncClient, target: Target, stream: bool) -> None:
    body = {"model": MODEL, "messages": MSG, "stream": stream}
    started = time.perf_counter()
    if not stream:
        response = await client.post(target.url, headers=target.headers, json=body)
        response.raise_for_status()
        target.totals.append((time.perf_counter() - started) * 1000)
        return
    first: float | None = None
    async with client.stream("POST", target.url, headers=target.headers, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    assert first is not None, f"{target.name} streamed no chunk"
    target.ttfts.append((first - started) * 1000)


async def measure(targets: list[Target], rounds: int, warmup: int, rng: random.Random) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for n in range(warmup + rounds):
            order = targets[:]
            rng.shuffle(order)
            for target in order:
                for stream in rng.sample([False, True], 2):
                    await once(client, target, stream)
            if n == warmup - 1:
                for target in targets:
                    target.totals.clear()
                    target.ttfts.clear()


def figures(target: Target) -> dict[str, float]:
    return {
        "nonstream_p50_ms": pct(target.totals, 0.5),
        "nonstream_p99_ms": pct(target.totals, 0.99),
        "ttft_p50_ms": pct(target.ttfts, 0.5),
        "ttft_p99_ms": pct(target.ttfts, 0.99),
    }


def report(targets: list[Target], rounds: int) -> dict[str, dict[str, float]]:
    """Print the side-by-side table; returns each target's figures and what it adds over direct."""
    floor = figures(targets[0])
    print(f"\nconcurrency 1, {rounds} interleaved rounds, 8-chunk stand-in on loopback; added = target - direct")
    print(
        f"{'target':>8} | {'non-stream p50':>14} {'p99':>8} {'added p50':>10} {'p99':>8} | "
        f"{'TTFT p50':>9} {'p99':>8} {'added p50':>10} {'p99':>8}"
    )
    rows = {}
    for target in targets:
        mine = figures(target)
        added = {k: v - floor[k] for k, v in mine.items()}
        rows[target.name] = {**mine, **{f"added_{k}": v for k, v in added.items()}}
        print(
            f"{target.name:>8} | {mine['nonstream_p50_ms']:>11.2f} ms {mine['nonstream_p99_ms']:>8.2f}"
            f" {added['nonstream_p50_ms']:>+10.2f} {added['nonstream_p99_ms']:>+8.2f} |"
            f" {mine['ttft_p50_ms']:>9.2f} {mine['ttft_p99_ms']:>8.2f}"
            f" {added['ttft_p50_ms']:>+10.2f} {added['ttft_p99_ms']:>+8.2f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--targets", default="pool,litellm,portkey")
    parser.add_argument("--database", default=os.environ.get("POOL_BENCH_DATABASE_URL", BENCH_DB))
    args = parser.parse_args()
    wanted = args.targets.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="pool-gateways-"))
    procs: list[localpool.Proc] = []
    pool: Pool | None = None
    try:
        port = localpool.free_port()
        procs.append(localpool.start_standin(port, workdir, name="backend", chunks=8))
        backend = f"http://127.0.0.1:{port}"
        targets = [Target("direct", f"{backend}/v1/chat/completions", {})]
        if "pool" in wanted:
            pool = Pool(
                workdir,
                db_url=asyncio.run(fresh_database(args.database)),
                log_level="WARNING",
                heartbeat_interval="5",
                rate_limit_rpm="1000000",
                rate_limit_tpm="1000000000",
                credit_lease_idle_seconds="5",
                **dict(arg.split("=", 1) for arg in os.environ.get("POOL_BENCH_SETTINGS", "").split() if arg),
            )
            pool.start()
            pool.agent(backend, [MODEL], max_concurrency=256, extra_env={"POOL_AGENT_LOG_LEVEL": "WARNING"})
            targets.append(Target("pool", f"{pool.url}/v1/chat/completions", {"authorization": f"Bearer {pool.key}"}))
        if "litellm" in wanted:
            litellm_port = localpool.free_port()
            procs.append(peers.start_litellm(litellm_port, backend, MODEL, workdir))
            url = f"http://127.0.0.1:{litellm_port}/v1/chat/completions"
            targets.append(Target("litellm", url, {"authorization": f"Bearer {peers.MASTER_KEY}"}))
        if "portkey" in wanted:
            portkey_port = localpool.free_port()
            procs.append(peers.start_portkey(portkey_port, workdir))
            url = f"http://127.0.0.1:{portkey_port}/v1/chat/completions"
            targets.append(Target("portkey", url, peers.portkey_headers(backend)))
        asyncio.run(measure(targets, args.rounds, args.warmup, random.Random(7)))
        rows = report(targets, args.rounds)
        RESULTS.mkdir(exist_ok=True)
        out = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "rounds": args.rounds,
            "versions": {"litellm": peers.LITELLM, "portkey": peers.PORTKEY},
            "concurrency_1": rows,
        }
        (RESULTS / "gateways.json").write_text(json.dumps(out, indent=2))
        print(f"\nwritten: {RESULTS / 'gateways.json'}")
    finally:
        if pool is not None:
            pool.stop()
        for proc in procs:
            proc.stop()


if __name__ == "__main__":
    main()
