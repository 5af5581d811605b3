"""The stream ramp: many paced streams open at once through each target, level after level.

A stand-in sends 64 chunks 20 ms apart; each target opens 1, 10, 100, … 1,000 such streams at once
(a single stream ten times in a row, so that a p99 rests on 600 gaps).
Per level: the gap between chunks (p50/p99, and added over the direct call at the same level),
chunks lost, the first level where the gap p99 passes twice the pace, and the memory each open
stream costs the target (its processes' RSS mid-stream over their RSS before the ramp).

The client is a bare asyncio protocol that only timestamps the ``data: {`` lines it receives, so
that one Python process can hold 1,000 streams without becoming what is measured.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from tests.bench import procs
from tests.bench.common import Endpoint, pct

PACE_MS = 20.0
CHUNKS = 64
MIN_STREAMS = 10  # a level with fewer streams repeats, so that its p99 rests on 600 gaps or more
_MARK = b"data: {"


class _Stream(asyncio.Protocol):
    """One streamed request over its own connection (``Connection: close``): the arrival time of
    every chunk, and whether the answer was a 200."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.arrivals: list[float] = []
        self.status_ok: bool | None = None
        self._tail = b""  # a mark split across two reads is counted once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.status_ok is None:
            self.status_ok = data.startswith(b"HTTP/1.1 200")
        seen = self._tail + data
        self.arrivals.extend([now] * seen.count(_MARK))
        self._tail = seen[-(len(_MARK) - 1) :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def request_bytes(url: str, headers: dict[str, str], body: bytes) -> bytes:
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path} HTTP/1.1",
        f"host: {parts.netloc}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def paced_stream(target: Endpoint, model: str) -> tuple[list[float], int]:
    """One stream: the gaps between its chunks (ms) and how many arrived (0 for a failed one)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "bench"}], "stream": True})
    parts = urlsplit(target.url)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    request = request_bytes(target.url, target.headers, body.encode())
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    transport, stream = await loop.create_connection(lambda: _Stream(request, done), host, port)
    try:
        await asyncio.wait_for(done, 120)
    finally:
        transport.close()
    if not stream.status_ok:
        return [], 0
    return [(b - a) * 1000 for a, b in itertools.pairwise(stream.arrivals)], len(stream.arrivals)


@dataclass
class Level:
    gaps: list[float]
    chunks: list[int]  # per stream; a failed stream counts 0
    rss_kb: int  # the target's processes, mid-stream


async def open_streams(target: Endpoint, model: str, count: int) -> Level:
    tasks = [asyncio.create_task(paced_stream(target, model)) for _ in range(count)]
    await asyncio.sleep(CHUNKS * PACE_MS / 1000 / 2)  # mid-stream: every stream is open
    busy = procs.rss_kb(target.pids)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    gaps = [g for r in results if not isinstance(r, BaseException) for g in r[0]]
    chunks = [0 if isinstance(r, BaseException) else r[1] for r in results]
    return Level(gaps, chunks, busy)


def ramp(targets: list[Endpoint], model: str, levels: list[int], rng: random.Random) -> dict[str, dict[str, object]]:
    """Open ``level`` paced streams at once on each target (in random order), level after level;
    the first target is the direct call the others are compared with."""
    print(f"\nstreams of {CHUNKS} chunks, {PACE_MS:g} ms apart; added = target - direct at the same level")
    print(
        f"{'streams':>7} {'target':>8} | {'gap p50':>8} {'p99':>8} {'added p50':>10} {'p99':>8} |"
        f" {'lost':>6} | {'KB/stream':>9}"
    )
    rows: dict[str, dict[str, object]] = {t.name: {"levels": {}, "saturates_at": None} for t in targets}
    before = {t.name: procs.rss_kb(t.pids) for t in targets}
    expected = 0  # chunks in a whole stream, as the direct call receives it
    for count in levels:
        measured = {target.name: Level([], [], 0) for target in targets}
        for _ in range(max(1, MIN_STREAMS // count)):  # rounds, each target in a fresh random order
            order = targets[:]
            rng.shuffle(order)
            for target in order:
                level, seen = measured[target.name], asyncio.run(open_streams(target, model, count))
                level.gaps += seen.gaps
                level.chunks += seen.chunks
                level.rss_kb = max(level.rss_kb, seen.rss_kb)
        floor = measured[targets[0].name]
        expected = max(expected, *floor.chunks)
        for target in targets:
            level = measured[target.name]
            p50, p99 = pct(level.gaps or [0.0], 0.5), pct(level.gaps or [0.0], 0.99)
            added50, added99 = p50 - pct(floor.gaps or [0.0], 0.5), p99 - pct(floor.gaps or [0.0], 0.99)
            lost = sum(expected - c for c in level.chunks)
            per_stream = max(0, level.rss_kb - before[target.name]) / count
            row = rows[target.name]
            row["levels"][count] = {  # type: ignore[index]
                "gap_p50_ms": p50,
                "gap_p99_ms": p99,
                "added_gap_p50_ms": added50,
                "added_gap_p99_ms": added99,
                "lost_chunks": lost,
                "kb_per_stream": per_stream,
            }
            if row["saturates_at"] is None and p99 > 2 * PACE_MS:
                row["saturates_at"] = count
            print(
                f"{count:>7} {target.name:>8} | {p50:>8.2f} {p99:>8.2f} {added50:>+10.2f} {added99:>+8.2f} |"
                f" {lost:>6} | {per_stream:>9.1f}",
                flush=True,
            )
    for target in targets:
        saturated = rows[target.name]["saturates_at"]
        print(f"{target.name:>8}: gap p99 passes {2 * PACE_MS:g} ms at {saturated or 'no level measured'} streams")
    return rows
