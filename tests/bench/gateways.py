"""Added latency of the pool beside LiteLLM's proxy and Portkey's gateway, in one run on one machine.

Four targets in front of the same loopback stand-in backend (8 chunks, no pacing): the stand-in
called directly; the pool (coordinator + one agent, credits, rate limits and the request log on,
PostgreSQL); LiteLLM's proxy; Portkey's gateway. At concurrency 1, after a warm-up, each round
sends one non-streamed and one streamed request to every target in a fresh random order; added
latency is a target's percentile minus the direct call's, for non-stream totals and stream time to
first token. Then streams: a second stand-in sends 64 chunks 20 ms apart, and each target opens
10, 100, … 1,000 such streams at once: the gap between chunks (p50/p99, and added over the direct
call at the same level), chunks lost, the first level where the gap p99 passes twice the pace, and
the memory each open stream costs the target (its processes' RSS mid-stream minus before).

    .venv/bin/python -m tests.bench.gateways [--rounds 300] [--levels 10,100,250,500,1000]
        [--targets pool,litellm,portkey]

The peers install on first use under ``tests/bench/.peers/`` (see ``tests/bench/peers.py``).
Results are also written to ``tests/bench/results/gateways.json``. For experiments,
``POOL_BENCH_SETTINGS="ledger_flush_interval=60 …"`` passes coordinator settings to the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
from tests.bench.common import pct, pool_under_load
from tests.harness import Pool

MODEL = "smollm2-135m"  # directory slugs, so the pool admits the stand-ins under them
PACED_MODEL = "gemma-3-270m"
PACE_MS = 20.0
PACED_CHUNKS = 64
BENCH_DB = "postgresql+asyncpg://postgres@127.0.0.1:5432/bench"
RESULTS = Path(__file__).parent / "results"
MSG = [{"role": "user", "content": "bench"}]


@dataclass
class Target:
    name: str
    url: str  # the chat completions endpoint
    headers: dict[str, str]
    paced_headers: dict[str, str]  # for the paced stand-in's model
    pids: list[int]  # the processes whose memory counts (children included)
    totals: list[float] = field(default_factory=list)  # non-stream, ms
    ttfts: list[float] = field(default_factory=list)  # stream, ms


def rss_kb(pids: list[int]) -> int:
    """Resident memory of ``pids`` and all their descendants, in KB (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    family, grew = set(pids), True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    total = 0
    for pid in family:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


async def paced_stream(client: httpx.AsyncClient, target: Target) -> tuple[list[float], int]:
    """One stream from the paced stand-in: gaps between its chunks (ms) and how many arrived."""
    body = {"model": PACED_MODEL, "messages": MSG, "stream": True}
    arrivals: list[float] = []
    async with client.stream("POST", target.url, headers=target.paced_headers, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())
    return [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)], len(arrivals)


@dataclass
class Level:
    gaps: list[float]
    chunks: list[int]  # per stream; a failed stream counts 0
    kb_per_stream: float


async def open_streams(target: Target, count: int) -> Level:
    idle = rss_kb(target.pids)
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = [asyncio.create_task(paced_stream(client, target)) for _ in range(count)]
        await asyncio.sleep(PACED_CHUNKS * PACE_MS / 1000 / 2)  # mid-stream: every stream is open
        busy = rss_kb(target.pids)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    gaps = [g for r in results if not isinstance(r, BaseException) for g in r[0]]
    chunks = [0 if isinstance(r, BaseException) else r[1] for r in results]
    return Level(gaps, chunks, max(0, busy - idle) / count)


def ramp(targets: list[Target], levels: list[int], rng: random.Random) -> dict[str, dict[str, object]]:
    """Open ``level`` paced streams at once on each target (in random order), level after level."""
    print(f"\nstreams of {PACED_CHUNKS} chunks, {PACE_MS:g} ms apart; added = target - direct at the same level")
    print(
        f"{'streams':>7} {'target':>8} | {'gap p50':>8} {'p99':>8} {'added p50':>10} {'p99':>8} |"
        f" {'lost':>6} | {'KB/stream':>9}"
    )
    rows: dict[str, dict[str, object]] = {t.name: {"levels": {}, "saturates_at": None} for t in targets}
    expected = 0
    for count in levels:
        order = targets[:]
        rng.shuffle(order)
        measured = {target.name: asyncio.run(open_streams(target, count)) for target in order}
        expected = max(expected, *measured["direct"].chunks)
        floor = measured["direct"]
        for target in targets:
            level = measured[target.name]
            p50, p99 = pct(level.gaps or [0.0], 0.5), pct(level.gaps or [0.0], 0.99)
            added50, added99 = p50 - pct(floor.gaps or [0.0], 0.5), p99 - pct(floor.gaps or [0.0], 0.99)
            lost = sum(expected - c for c in level.chunks)
            row = rows[target.name]
            row["levels"][count] = {  # type: ignore[index]
                "gap_p50_ms": p50,
                "gap_p99_ms": p99,
                "added_gap_p50_ms": added50,
                "added_gap_p99_ms": added99,
                "lost_chunks": lost,
                "kb_per_stream": level.kb_per_stream,
            }
            if row["saturates_at"] is None and p99 > 2 * PACE_MS:
                row["saturates_at"] = count
            print(
                f"{count:>7} {target.name:>8} | {p50:>8.2f} {p99:>8.2f} {added50:>+10.2f} {added99:>+8.2f} |"
                f" {lost:>6} | {level.kb_per_stream:>9.1f}",
                flush=True,
            )
    for target in targets:
        level = rows[target.name]["saturates_at"]
        print(
            f"{target.name:>8}: gap p99 passes {2 * PACE_MS:g} ms at {level if level else 'no level measured'} streams"
        )
    return rows


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
    parser.add_argument("--levels", default="10,100,250,500,1000", help="concurrent streams, comma-separated")
    parser.add_argument("--database", default=os.environ.get("POOL_BENCH_DATABASE_URL", BENCH_DB))
    args = parser.parse_args()
    wanted = args.targets.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="pool-gateways-"))
    procs: list[localpool.Proc] = []
    pool: Pool | None = None
    try:
        port, paced_port = localpool.free_port(), localpool.free_port()
        procs.append(localpool.start_standin(port, workdir, name="backend", chunks=8))
        procs.append(
            localpool.start_standin(paced_port, workdir, name="paced", chunks=PACED_CHUNKS, interval_ms=PACE_MS)
        )
        backend, paced = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{paced_port}"
        # The direct call's "paced" model is the paced stand-in's own URL: a header-free twin target.
        targets = [Target("direct", f"{backend}/v1/chat/completions", {}, {}, [procs[0].popen.pid])]
        direct_paced = Target("direct", f"{paced}/v1/chat/completions", {}, {}, [procs[1].popen.pid])
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
            pids = [pool.coordinator.popen.pid, fast_agent.popen.pid, paced_agent.popen.pid]
            targets.append(Target("pool", f"{pool.url}/v1/chat/completions", auth, auth, pids))
        if "litellm" in wanted:
            litellm_port = localpool.free_port()
            procs.append(peers.start_litellm(litellm_port, {MODEL: backend, PACED_MODEL: paced}, workdir))
            url = f"http://127.0.0.1:{litellm_port}/v1/chat/completions"
            auth = {"authorization": f"Bearer {peers.MASTER_KEY}"}
            targets.append(Target("litellm", url, auth, auth, [procs[-1].popen.pid]))
        if "portkey" in wanted:
            portkey_port = localpool.free_port()
            procs.append(peers.start_portkey(portkey_port, workdir))
            url = f"http://127.0.0.1:{portkey_port}/v1/chat/completions"
            headers, paced_headers = peers.portkey_headers(backend), peers.portkey_headers(paced)
            targets.append(Target("portkey", url, headers, paced_headers, [procs[-1].popen.pid]))
        rng = random.Random(7)
        asyncio.run(measure(targets, args.rounds, args.warmup, rng))
        rows = report(targets, args.rounds)
        levels = [int(level) for level in args.levels.split(",") if level]
        streams = ramp([direct_paced, *targets[1:]], levels, rng) if levels else {}
        RESULTS.mkdir(exist_ok=True)
        out = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "rounds": args.rounds,
            "versions": {"litellm": peers.LITELLM, "portkey": peers.PORTKEY},
            "concurrency_1": rows,
            "streams": streams,
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
