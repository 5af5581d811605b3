"""Page load times from the coordinator over loopback, with 1,000 minutes of status history in the
database (the pool and two models, so 3,000 rows), beside ``/healthz`` (the floor any request pays)
in the same run. Twice: with the history cache warm (the default: one merged read per flush
interval) and cold (a flush interval so short that nearly every load reads and merges the table).

``python -m tests.bench.pages [--rounds 200] [--points 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from pathlib import Path

import httpx

from coordinator.core import db
from coordinator.status import history
from coordinator.status.history import Minute
from tests.bench.common import pct
from tests.harness import Pool

PAGES = ["/healthz", "/status", "/status/live", "/v1/pool/status?history=24h", "/portal", "/portal/provider"]


async def fill(url: str, points: int) -> None:
    """``points`` minutes of history up to now, for the pool and two models, as one old process wrote them."""
    engine = db.create_engine(url)
    now = history.minute_of(time.time())
    rows = []
    for n in range(points):
        t = now - (points - n) * 60
        for model in (history.POOL, "smollm2-135m", "gemma-3-270m"):
            minute = Minute(providers={1, 2, 3})
            for ms in range(1, 40):
                minute.add(ms * 7.0, fallback=ms % 9 == 0, ok=ms % 13 != 0)
            rows.append(minute.row(t, "crd_bench", model))
    async with engine.begin() as conn:
        await conn.execute(history.insert(history._table), rows)
    await engine.dispose()


def signed_in(pool: Pool) -> httpx.Client:
    client = httpx.Client(base_url=pool.url, timeout=10)
    page = client.get("/portal/signup")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    done = client.post("/portal/signup", data={"csrf": csrf[1], "email": "bench@example.com", "password": "x" * 12})
    assert done.status_code == 303, done.text
    return client


def measure(client: httpx.Client, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {path: [] for path in PAGES}
    for _ in range(rounds):
        for path in PAGES:  # interleaved, so drift hits every page alike
            started = time.perf_counter()
            response = client.get(path)
            times[path].append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (path, response.status_code)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--points", type=int, default=1000)
    args = parser.parse_args()
    for label, flush in (("warm cache (flush 10 s)", "10"), ("cold cache (flush 0.05 s)", "0.05")):
        with tempfile.TemporaryDirectory() as workdir:
            pool = Pool(Path(workdir), status_flush_seconds=flush, log_level="WARNING")
            pool.start()
            try:
                asyncio.run(fill(pool.db_url, args.points))
                client = signed_in(pool)
                try:
                    measure(client, 5)  # warm-up
                    times = measure(client, args.rounds)
                finally:
                    client.close()
            finally:
                pool.stop()
        floor = pct(times["/healthz"], 0.5)
        print(f"\n{label}: {args.points} history minutes x 3 series, {args.rounds} loads each, SQLite")
        print(f"{'page':32} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'p50 / healthz':>14}")
        for path, values in times.items():
            p50 = pct(values, 0.5)
            print(f"{path:32} {p50:8.2f} {pct(values, 0.95):8.2f} {max(values):8.2f} {p50 / floor:13.1f}x")


if __name__ == "__main__":
    main()
