"""Per-minute pool status history: rows of several processes merged on both databases, pruning, a
failed flush, and ``/v1/pool/status?history=…`` on a real coordinator with an agent and the upstream.
The latency histogram itself is in tests/unit/test_history.py."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from sqlalchemy import insert, select

from coordinator.core import db
from coordinator.status import history
from coordinator.status.history import History, Minute
from tests.harness import Pool, with_upstream
from tests.waiting import eventually

T0 = 1_800_000_030.0  # half a minute into a minute


async def test_processes_rows_merge_and_old_minutes_are_pruned(db_url: str) -> None:
    now = [T0]
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        a = History(engine, "crd_a", retention_seconds=3600, cache_seconds=0, clock=lambda: now[0])
        b = History(engine, "crd_b", retention_seconds=3600, cache_seconds=0, clock=lambda: now[0])
        for ms in (100, 200, 300):
            a.record("m1", ms, fallback=False, ok=True)
        a.record("m1", 50, fallback=False, ok=False)
        b.record("m1", 1000, fallback=True, ok=True)
        b.record("m2", 20, fallback=False, ok=True)
        a.providers({"m1": {1, 2}})
        b.providers({"m1": {2, 3}, "m2": {3}})
        gone = history.minute_of(T0 - 7200)  # a minute past the retention, left by a process long gone
        async with engine.begin() as conn:
            await conn.execute(insert(history._table), [Minute(requests=9).row(gone, "crd_old", history.POOL)])
        await a.flush()
        await a.flush()  # a second flush of the same minute replaces the process's rows
        await b.flush()
        series = await a.read(7200)
        t = history.minute_of(T0)
        assert series.since == t - 7200 + 60
        assert [(p.t, p.requests, p.activeProviders, p.fallbackRate, p.p95LatencyMs) for p in series.pool] == [
            (t, 6, 3, 0.2, 1000.0)
        ]
        m1, m2 = series.models["m1"], series.models["m2"]
        assert [(p.requests, p.activeProviders, p.fallbackRate, p.p95LatencyMs) for p in m1] == [(5, 3, 0.25, 1000.0)]
        assert [(p.requests, p.activeProviders, p.fallbackRate, p.p95LatencyMs) for p in m2] == [(1, 1, 0.0, 20.0)]

        # The next minute: the closed one stays as written, the new one is added, nothing is counted twice.
        now[0] = T0 + 60
        a.record("m1", 400, fallback=False, ok=True)
        await a.flush()
        await b.flush()
        later = await b.read(3600)
        assert [(p.t, p.requests) for p in later.pool] == [(t, 6), (t + 60, 1)]
        assert [(p.t, p.requests, p.activeProviders) for p in later.models["m1"]] == [(t, 5, 3), (t + 60, 1, 0)]
        async with engine.connect() as conn:
            minutes = {row[0] for row in (await conn.execute(select(history._table.c.minute))).all()}
        assert gone not in minutes
    finally:
        await engine.dispose()


def _history(pool: Pool, span: str = "1h") -> httpx.Response:
    return httpx.get(f"{pool.url}/v1/pool/status", params={"history": span}, timeout=10)


def test_status_history_counts_what_the_pool_served_and_survives_a_restart(tmp_path: Path) -> None:
    pool = with_upstream(
        tmp_path, "gemma-3-270m=upstream-gemma", upstream_api_key="sk-platform", status_flush_seconds="0.3"
    )
    pool.start()
    try:
        pool.agent(pool.standin(chunks=2), ["smollm2-135m"])
        # A sleep on purpose: keep every request in one wall-clock minute of the coordinator's process,
        # so its p95 can be checked exactly.
        if time.time() % 60 > 45:
            time.sleep(61 - time.time() % 60)
        latencies = []
        for model in ("smollm2-135m",) * 3 + ("gemma-3-270m",) * 2:
            response = pool.post({"model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 200, response.text
            latencies.append(response.json()["x_pool"]["latency_ms"])
        refused = pool.post({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 404  # refused before any work: not a request the pool served

        def served() -> dict[str, object] | None:
            body = _history(pool).json()
            return dict(body["history"]) if sum(p["requests"] for p in body["history"]["points"]) >= 5 else None

        past = eventually(served, timeout=10)
        assert past["bucketSeconds"] == 60
        [point] = [p for p in past["points"] if p["requests"]]  # type: ignore[attr-defined]
        assert (point["requests"], point["activeProviders"], point["fallbackRate"]) == (5, 1, 0.4)
        assert point["p95LatencyMs"] == max(latencies)  # nearest rank of 5 is the slowest, read exactly
        by_model = {m["modelSlug"]: m["points"] for m in past["byModel"]}  # type: ignore[attr-defined]
        smol = [p for p in by_model["smollm2-135m"] if p["requests"]]
        gemma = [p for p in by_model["gemma-3-270m"] if p["requests"]]
        assert [(p["requests"], p["activeProviders"], p["fallbackRate"]) for p in smol] == [(3, 1, 0.0)]
        assert [(p["requests"], p["activeProviders"], p["fallbackRate"]) for p in gemma] == [(2, 0, 1.0)]
        assert "history" not in httpx.get(f"{pool.url}/v1/pool/status", timeout=10).json()

        pool.restart()  # the history is in the database: a new process reads it back
        again = eventually(served, timeout=10)
        assert [p for p in again["points"] if p["requests"]] == [point]  # type: ignore[attr-defined]

        for span in ("25h", "0m", "1d", "24", "-1h", "h"):
            refused = _history(pool, span)
            assert refused.status_code == 400, span
            assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("invalid_request", "history")
        schema = httpx.get(f"{pool.url}/schema/openapi.json", timeout=10).json()
        parameters = schema["paths"]["/v1/pool/status"]["get"]["parameters"]
        assert [p["name"] for p in parameters] == ["history"]
    finally:
        pool.stop()


async def test_a_failed_flush_keeps_its_minutes_and_reads_share_one_cached_merge(db_url: str) -> None:
    now = [T0]
    engine = db.create_engine(db_url)
    try:
        history_ = History(engine, "crd_a", retention_seconds=3600, cache_seconds=3600, clock=lambda: now[0])
        history_.record("m1", 10, fallback=False, ok=True)
        await history_.flush()  # no table yet: the database is "away"
        await db.migrate(engine)
        now[0] = T0 + 60  # the minute closed while the database was away
        await history_.flush()
        t = history.minute_of(T0)
        first = await history_.read(3600)
        assert [(p.t, p.requests) for p in first.pool] == [(t, 1), (t + 60, 0)]
        history_.record("m1", 10, fallback=False, ok=True)
        await history_.flush()
        # within the cache time every span is cut from the same merged read: no span costs a new one
        assert [(p.t, p.requests) for p in (await history_.read(60)).pool] == [(t + 60, 0)]
        assert (await history_.read(3600)).pool == first.pool
    finally:
        await engine.dispose()
