"""The pool beside LiteLLM's proxy and Portkey's gateway, in one run on one machine.

Four targets in front of the same loopback stand-in backend: the stand-in called directly; the
pool (coordinator + one agent, credits, rate limits and the request log on, PostgreSQL); LiteLLM's
proxy; Portkey's gateway. Four measures, in this order:

1. latency at concurrency 1 (8-chunk stand-in, no pacing): after a warm-up, each round sends one
   non-streamed and one streamed request to every target in a fresh random order; added latency is
   a target's percentile minus the direct call's, for non-stream totals and time to first token;
2. throughput on one core (:mod:`tests.bench.throughput`): a closed-loop concurrency sweep with
   wrk, the highest request rate with p99 under 10, 50 and 100 ms and no error, CPU per request,
   and memory idle, under load and after;
3. the stream ramp (:mod:`tests.bench.streams`): 10 … 1,000 streams of 64 chunks paced 20 ms;
4. idle agents (:mod:`tests.bench.idle_agents`): what 1, 100 and 10,000 connected agents cost a
   fresh coordinator.

    .venv/bin/python -m tests.bench.gateways [--rounds 300] [--levels 1,10,100,250,500,1000]
        [--targets pool,litellm,portkey] [--seconds 5] [--agents 1,100,10000] [--pause-ms 0]

The peers install on first use under ``tests/bench/.peers/`` (see ``tests/bench/peers.py``).
Results go to ``tests/bench/results/gateways.json`` and a chart to ``gateways.png`` beside it.
For experiments, ``POOL_BENCH_SETTINGS="ledger_flush_interval=60 …"`` passes coordinator settings
to the pool; an empty ``--levels``, ``--seconds 0`` or ``--agents ""`` skips that measure.
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
from tests.bench import chart, idle_agents, peers, streams, throughput
from tests.bench.common import Endpoint, pct, pool_under_load
from tests.harness import Pool

MODEL = "smollm2-135m"  # directory slugs, so the pool admits the stand-ins under them
PACED_MODEL = "gemma-3-270m"
BENCH_DB = "postgresql+asyncpg://postgres@127.0.0.1:5432/bench"
RESULTS = Path(__file__).parent / "results"
MSG = [{"role": "user", "content": "bench"}]


@dataclass
class Target(Endpoint):
    """An endpoint, the headers its paced stand-in's model wants, and its concurrency-1 figures."""

    paced_headers: dict[str, str] = field(default_factory=dict)
    totals: list[float] = field(default_factory=list)  # non-stream, ms
    ttfts: list[float] = field(default_factory=list)  # stream, ms


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


async def measure(targets: list[Target], rounds: int, warmup: int, rng: random.Random, pause_ms: float = 0) -> None:
    """Interleaved rounds; ``pause_ms`` idles before every request (to see what waking cores costs)."""
    async with httpx.AsyncClient(timeout=30) as client:
        for n in range(warmup + rounds):
            order = targets[:]
            rng.shuffle(order)
            for target in order:
                for stream in rng.sample([False, True], 2):
                    if pause_ms:
                        await asyncio.sleep(pause_ms / 1000)
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


def busy_processes(target: Target) -> dict[str, list[int]]:
    """The processes the throughput sweep loads (the paced agent sits it out)."""
    return {label: pids for label, pids in target.processes.items() if label != "paced agent"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--pause-ms", type=float, default=0, help="idle before each concurrency-1 request")
    parser.add_argument("--targets", default="pool,litellm,portkey")
    parser.add_argument("--seconds", type=float, default=5, help="length of each throughput level (0: skip)")
    parser.add_argument("--levels", default="1,10,100,250,500,1000", help="concurrent streams, comma-separated")
    parser.add_argument("--agents", default="1,100,10000", help="idle agents to connect, comma-separated")
    parser.add_argument("--database", default=os.environ.get("POOL_BENCH_DATABASE_URL", BENCH_DB))
    args = parser.parse_args()
    wanted = args.targets.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="pool-gateways-"))
    started: list[localpool.Proc] = []
    pool: Pool | None = None
    out: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rounds": args.rounds,
        "versions": {"litellm": peers.LITELLM, "portkey": peers.PORTKEY},
    }
    try:
        port, paced_port = localpool.free_port(), localpool.free_port()
        started.append(localpool.start_standin(port, workdir, name="backend", chunks=8))
        started.append(
            localpool.start_standin(
                paced_port, workdir, name="paced", chunks=streams.CHUNKS, interval_ms=streams.PACE_MS
            )
        )
        backend, paced = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{paced_port}"
        standins = [proc.popen.pid for proc in started]
        targets = [Target("direct", f"{backend}/v1/chat/completions", {}, {})]
        # The direct call's paced twin is the paced stand-in itself.
        direct_paced = Endpoint("direct", f"{paced}/v1/chat/completions", {}, {"stand-in": [standins[1]]})
        if "pool" in wanted:
            pool = pool_under_load(
                workdir,
                asyncio.run(fresh_database(args.database)),
                **dict(arg.split("=", 1) for arg in os.environ.get("POOL_BENCH_SETTINGS", "").split() if arg),
            )
            pool.start()
            quiet = {"POOL_AGENT_LOG_LEVEL": "WARNING"}
            fast_agent = pool.agent(backend, [MODEL], max_concurrency=256, extra_env=quiet)
            paced_agent = pool.agent(paced, [PACED_MODEL], max_concurrency=1024, extra_env=quiet)
            auth = {"authorization": f"Bearer {pool.key}"}
            assert pool.coordinator is not None
            processes = {
                "coordinator": [pool.coordinator.popen.pid],
                "agent": [fast_agent.popen.pid],
                "paced agent": [paced_agent.popen.pid],
            }
            targets.append(Target("pool", f"{pool.url}/v1/chat/completions", auth, processes, auth))
        if "litellm" in wanted:
            litellm_port = localpool.free_port()
            started.append(peers.start_litellm(litellm_port, {MODEL: backend, PACED_MODEL: paced}, workdir))
            url = f"http://127.0.0.1:{litellm_port}/v1/chat/completions"
            auth = {"authorization": f"Bearer {peers.MASTER_KEY}"}
            targets.append(Target("litellm", url, auth, {"litellm": [started[-1].popen.pid]}, auth))
        if "portkey" in wanted:
            portkey_port = localpool.free_port()
            started.append(peers.start_portkey(portkey_port, workdir))
            url = f"http://127.0.0.1:{portkey_port}/v1/chat/completions"
            headers, paced_headers = peers.portkey_headers(backend), peers.portkey_headers(paced)
            targets.append(Target("portkey", url, headers, {"portkey": [started[-1].popen.pid]}, paced_headers))
        rng = random.Random(7)
        asyncio.run(measure(targets, args.rounds, args.warmup, rng, args.pause_ms))
        out["concurrency_1"] = report(targets, args.rounds)
        if args.seconds > 0:
            body = json.dumps({"model": MODEL, "messages": MSG}).encode()
            gateways = [Endpoint(t.name, t.url, t.headers, busy_processes(t)) for t in targets]
            sweeps = throughput.run(gateways, body, workdir, args.seconds, load_pids=standins)
            throughput.report(sweeps)
            out["throughput"] = {s.gateway: s.summary() for s in sweeps}
        levels = [int(level) for level in args.levels.split(",") if level]
        if levels:
            ramp_targets = [direct_paced]
            ramp_targets += [Endpoint(t.name, t.url, t.paced_headers, t.processes) for t in targets[1:]]
            out["streams"] = streams.ramp(ramp_targets, PACED_MODEL, levels, rng)
        counts = tuple(int(count) for count in args.agents.split(",") if count)
        if pool is not None and counts:
            pool.restart()  # a fresh coordinator: what the agents cost, not what load left behind
            assert pool.coordinator is not None
            rows = asyncio.run(
                idle_agents.measure(pool.url, pool.token, backend, MODEL, pool.coordinator.popen.pid, counts)
            )
            out["idle_agents"] = rows
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "gateways.json").write_text(json.dumps(out, indent=2))
        chart.write(out, RESULTS / "gateways.png")
        print(f"\nwritten: {RESULTS / 'gateways.json'} and {RESULTS / 'gateways.png'}")
    finally:
        if pool is not None:
            pool.stop()
        for proc in started:
            proc.stop()


if __name__ == "__main__":
    main()
