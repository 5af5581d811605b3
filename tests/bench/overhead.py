"""Pool overhead against a direct call, measured in one run.

A loopback stand-in backend streams N chunks at a set pace. The same requests go directly to it and
through coordinator + agent (real processes); the table shows medians/p99 for both and what the pool
adds: latency for non-stream requests, time to first token and inter-chunk gap for streams, at
concurrency 1, 16 and 64. A second table does the same for the other kinds and shapes: embeddings
of one input and of 64 (576 numbers each, base64 through the pool as the OpenAI SDK asks, floats
from the stand-in), and a Responses stream against the same chat stream asked of the stand-in.

    .venv/bin/python -m tests.bench.overhead [--requests 200] [--chunks 20] [--interval-ms 5] [--kinds-only]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.bench.common import pct, pool_under_load

# Directory slugs the two stand-ins are announced as (the pool only admits models in its directory).
FAST, PACED = "smollm2-135m", "gemma-3-270m"

MSG = [{"role": "user", "content": "bench"}]


async def non_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str) -> float:
    started = time.perf_counter()
    response = await client.post(url, headers=headers, json={"model": model, "messages": MSG})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str) -> tuple[float, list[float]]:
    started = time.perf_counter()
    first: float | None = None
    stamps: list[float] = []
    body = {"model": model, "messages": MSG, "stream": True}
    async with client.stream("POST", url, headers=headers, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                first = first or now
                stamps.append(now)
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    return ((first or started) - started) * 1000, gaps


async def run_level(url: str, headers: dict[str, str], model: str, concurrency: int, total: int, streaming: bool):  # type: ignore[no-untyped-def]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        queue = list(range(total))
        results: list[object] = []

        async def worker() -> None:
            while queue:
                queue.pop()
                if streaming:
                    results.append(await stream(client, url, headers, model))
                else:
                    results.append(await non_stream(client, url, headers, model))

        for _ in range(min(5, total)):  # warm up connections
            await (stream(client, url, headers, model) if streaming else non_stream(client, url, headers, model))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results


EMBED = "smollm2-135m-embed"
TEXTS = [f"sentence number {i} about the weather in a city by the sea" for i in range(64)]


async def embed(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str, inputs: int) -> float:
    started = time.perf_counter()
    body: dict[str, object] = {"model": model, "input": TEXTS[0] if inputs == 1 else TEXTS[:inputs]}
    if headers:  # through the pool: as the OpenAI SDK asks by default
        body["encoding_format"] = "base64"
    response = await client.post(url, headers=headers, json=body)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def responses_stream(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str
) -> tuple[float, float]:
    """Time to the first text delta and to the end of a Responses stream."""
    started = time.perf_counter()
    first: float | None = None
    async with client.stream(
        "POST", url, headers=headers, json={"model": model, "input": "bench", "stream": True}
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: ") and '"response.output_text.delta"' in line:
                first = time.perf_counter()
    ended = time.perf_counter()
    return ((first or ended) - started) * 1000, (ended - started) * 1000


async def chat_stream_total(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str
) -> tuple[float, float]:
    first_ms, gaps = await stream(client, url, headers, model)
    return first_ms, first_ms + sum(gaps)


async def measure(call: Any, concurrency: int, total: int) -> list[Any]:
    """``call(client)`` ``total`` times, ``concurrency`` at once, after a few to warm up."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for _ in range(min(5, total)):
            await call(client)
        queue, results = list(range(total)), []

        async def worker() -> None:
            while queue:
                queue.pop()
                results.append(await call(client))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results


def kinds_table(pool: Any, embedder: str, paced: str, levels: list[int], requests: int) -> None:
    auth = {"authorization": f"Bearer {pool.key}"}
    print()
    header = f"{'conc':>4} | {'what':<26} | {'p50 direct/pool/added':>30} | {'p99 direct/pool/added':>30}"
    print(header)
    print("-" * len(header))
    for concurrency in levels:
        rows: list[tuple[str, list[float], list[float]]] = []
        for inputs in (1, 64):
            direct = asyncio.run(
                measure(
                    lambda c, n=inputs: embed(c, f"{embedder}/v1/embeddings", {}, "bench-embed", n),
                    concurrency,
                    requests,
                )
            )
            pooled = asyncio.run(
                measure(
                    lambda c, n=inputs: embed(c, f"{pool.url}/v1/embeddings", auth, EMBED, n), concurrency, requests
                )
            )
            rows.append((f"embeddings, {inputs} input{'s' if inputs > 1 else ''}", direct, pooled))
        direct_st = asyncio.run(
            measure(
                lambda c: chat_stream_total(c, f"{paced}/v1/chat/completions", {}, "bench-paced"), concurrency, requests
            )
        )
        pooled_st = asyncio.run(
            measure(lambda c: responses_stream(c, f"{pool.url}/v1/responses", auth, PACED), concurrency, requests)
        )
        rows.append(("Responses stream, TTFT", [r[0] for r in direct_st], [r[0] for r in pooled_st]))
        rows.append(("Responses stream, whole", [r[1] for r in direct_st], [r[1] for r in pooled_st]))
        for what, direct, pooled in rows:
            d50, p50, d99, p99 = pct(direct, 0.5), pct(pooled, 0.5), pct(direct, 0.99), pct(pooled, 0.99)
            print(
                f"{concurrency:>4} | {what:<26} | {d50:>8.2f} {p50:>8.2f} {p50 - d50:>+8.2f} ms"
                f" | {d99:>8.2f} {p99:>8.2f} {p99 - d99:>+8.2f} ms",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200, help="requests per level and path")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--levels", default="1,16,64", help="concurrency levels, comma-separated")
    parser.add_argument("--kinds-only", action="store_true", help="only the table of the other kinds and shapes")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    pool = pool_under_load(workdir)
    pool.start()
    try:
        fast = pool.standin(chunks=args.chunks)
        paced = pool.standin(chunks=args.chunks, interval_ms=args.interval_ms)
        pool.agent(fast, [f"{FAST}=bench-fast"], max_concurrency=256, extra_env={"POOL_AGENT_LOG_LEVEL": "WARNING"})
        pool.agent(paced, [f"{PACED}=bench-paced"], max_concurrency=256, extra_env={"POOL_AGENT_LOG_LEVEL": "WARNING"})
        embedder = pool.standin(dims=576)
        pool.agent(
            embedder, [f"{EMBED}=bench-embed"], max_concurrency=256, extra_env={"POOL_AGENT_LOG_LEVEL": "WARNING"}
        )
        if args.kinds_only:
            kinds_table(pool, embedder, paced, levels, args.requests)
            return
        pool_url = f"{pool.url}/v1/chat/completions"
        auth = {"authorization": f"Bearer {pool.key}"}
        print(f"stand-in: {args.chunks} chunks, stream pace {args.interval_ms} ms; {args.requests} requests per cell")
        header = (
            f"{'conc':>4} | {'non-stream p50 direct/pool/added':>34} | {'p99 direct/pool/added':>28} | "
            f"{'TTFT p50 direct/pool/added':>28} | {'gap mean direct/pool/added':>28}"
        )
        print(header)
        print("-" * len(header))
        for concurrency in levels:
            direct_ns = asyncio.run(
                run_level(f"{fast}/v1/chat/completions", {}, "bench-fast", concurrency, args.requests, False)
            )
            pooled_ns = asyncio.run(run_level(pool_url, auth, FAST, concurrency, args.requests, False))
            direct_st = asyncio.run(
                run_level(f"{paced}/v1/chat/completions", {}, "bench-paced", concurrency, args.requests, True)
            )
            pooled_st = asyncio.run(run_level(pool_url, auth, PACED, concurrency, args.requests, True))
            d50, p50 = pct(direct_ns, 0.5), pct(pooled_ns, 0.5)  # type: ignore[arg-type]
            d99, p99 = pct(direct_ns, 0.99), pct(pooled_ns, 0.99)  # type: ignore[arg-type]
            dt, pt = pct([r[0] for r in direct_st], 0.5), pct([r[0] for r in pooled_st], 0.5)  # type: ignore[index]
            dg = statistics.mean(g for r in direct_st for g in r[1])  # type: ignore[index]
            pg = statistics.mean(g for r in pooled_st for g in r[1])  # type: ignore[index]
            print(
                f"{concurrency:>4} | {d50:>9.2f} {p50:>9.2f} {p50 - d50:>+9.2f} ms"
                f" | {d99:>7.2f} {p99:>8.2f} {p99 - d99:>+8.2f} ms"
                f" | {dt:>7.2f} {pt:>8.2f} {pt - dt:>+8.2f} ms | {dg:>7.2f} {pg:>8.2f} {pg - dg:>+8.2f} ms",
                flush=True,
            )
        kinds_table(pool, embedder, paced, levels, args.requests)
    finally:
        pool.stop()


if __name__ == "__main__":
    main()
