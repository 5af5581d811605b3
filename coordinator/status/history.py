"""Per-minute pool status history behind ``GET /v1/pool/status?history=24h``.

Each coordinator process adds up the open minutes in memory (requests, fallbacks, a latency
histogram and the providers it saw), per model and for the whole pool, and every flush replaces its
own rows for those minutes in ``status_minutes``; closed minutes then leave memory. Readers merge the
rows of every process: counts add, histograms add, provider sets unite. Latencies are counted in
buckets 10 % wide so that the p95 of several processes can be merged; a p95 reads as its bucket's
upper edge, capped by the largest latency of the minute. Rows older than the retention are pruned by
the same flush.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import msgspec
from sqlalchemy import Table, and_, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core.models import StatusMinuteRow

log = logging.getLogger(__name__)
_table = cast(Table, StatusMinuteRow.__table__)
_json = msgspec.json.Encoder()

POOL = "*"  # the model column of rows about the whole pool
MINUTE = 60
GROWTH = 1.1  # each latency bucket is 10 % wider than the one below
_LOG_GROWTH = math.log(GROWTH)


def bucket(latency_ms: float) -> int:
    """The histogram bucket of a latency: bucket ``b`` holds (GROWTH**(b-1), GROWTH**b] ms."""
    return 0 if latency_ms <= 1 else math.ceil(math.log(latency_ms) / _LOG_GROWTH - 1e-9)


def minute_of(at: float) -> int:
    """The unix time (seconds) the minute holding ``at`` starts."""
    return int(at // MINUTE) * MINUTE


class StatusPoint(msgspec.Struct):
    t: int  # unix seconds at the start of the minute
    activeProviders: int
    requests: int
    p95LatencyMs: float | None
    fallbackRate: float


@dataclass(slots=True)
class Minute:
    """One minute of one model (or the pool), as seen by one or more processes."""

    requests: int = 0
    served: int = 0  # requests that ended well; latency and fallback rate are over these
    fallbacks: int = 0
    latency: Counter[int] = field(default_factory=Counter)
    max_ms: float = 0.0
    providers: set[int] = field(default_factory=set)

    def add(self, latency_ms: float, *, fallback: bool, ok: bool) -> None:
        self.requests += 1
        if ok:
            self.served += 1
            self.fallbacks += fallback
            self.latency[bucket(latency_ms)] += 1
            self.max_ms = max(self.max_ms, latency_ms)

    def merge(self, other: Minute) -> None:
        self.requests += other.requests
        self.served += other.served
        self.fallbacks += other.fallbacks
        self.latency.update(other.latency)
        self.max_ms = max(self.max_ms, other.max_ms)
        self.providers |= other.providers

    def p95(self) -> float | None:
        """Nearest-rank 95th percentile of the served requests' latency, from the histogram."""
        total = sum(self.latency.values())
        if not total:
            return None
        rank, seen = max(1, math.ceil(0.95 * total)), 0
        for b in sorted(self.latency):
            seen += self.latency[b]
            if seen >= rank:
                return round(min(GROWTH**b, self.max_ms), 1)
        raise AssertionError("unreachable: the ranks add up to the total")

    def point(self, t: int) -> StatusPoint:
        return StatusPoint(
            t=t,
            activeProviders=len(self.providers),
            requests=self.requests,
            p95LatencyMs=self.p95(),
            fallbackRate=round(self.fallbacks / self.served, 4) if self.served else 0.0,
        )

    def row(self, t: int, instance: str, model: str) -> dict[str, object]:
        return {
            "minute": t,
            "instance_id": instance,
            "model": model,
            "requests": self.requests,
            "served": self.served,
            "fallbacks": self.fallbacks,
            "latency": _json.encode({str(b): n for b, n in sorted(self.latency.items())}).decode(),
            "max_ms": self.max_ms,
            "providers": _json.encode(sorted(self.providers)).decode(),
        }

    @classmethod
    def from_row(cls, row: dict[str, object]) -> Minute:
        latency = msgspec.json.decode(cast(str, row["latency"]), type=dict[int, int])
        return cls(
            requests=cast(int, row["requests"]),
            served=cast(int, row["served"]),
            fallbacks=cast(int, row["fallbacks"]),
            latency=Counter(latency),
            max_ms=cast(float, row["max_ms"]),
            providers=set(msgspec.json.decode(cast(str, row["providers"]), type=list[int])),
        )


@dataclass(frozen=True, slots=True)
class Series:
    """Merged history from ``since`` on: the pool's points and each model's, minutes in order."""

    since: int
    pool: list[StatusPoint]
    models: dict[str, list[StatusPoint]]


class History:
    """This process's open minutes, written to and read from ``status_minutes``."""

    def __init__(
        self,
        engine: AsyncEngine,
        instance_id: str,
        retention_seconds: float,
        cache_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._instance = instance_id
        self.retention = retention_seconds
        self._cache_seconds = cache_seconds  # rows change once a flush interval, so reads may be that old
        self._open: dict[int, dict[str, Minute]] = {}
        self._lock = asyncio.Lock()
        self._reading = asyncio.Lock()  # one read of the table at a time; the others wait for it
        self._merged: tuple[float, Series] | None = None  # the whole retention, merged, and when

    def _minute(self, at: float) -> dict[str, Minute]:
        return self._open.setdefault(minute_of(at), {POOL: Minute()})

    def record(self, slug: str, latency_ms: float, *, fallback: bool, ok: bool) -> None:
        """Count one request that ended now."""
        minute = self._minute(self._clock())
        minute[POOL].add(latency_ms, fallback=fallback, ok=ok)
        minute.setdefault(slug, Minute()).add(latency_ms, fallback=fallback, ok=ok)

    def providers(self, serving: dict[str, set[int]]) -> None:
        """Note the providers connected now, by the model they serve."""
        minute = self._minute(self._clock())
        for slug, providers in serving.items():
            minute[POOL].providers |= providers
            minute.setdefault(slug, Minute()).providers |= providers

    async def flush(self) -> None:
        """Replace this process's rows for the open minutes, forget closed ones, prune old rows."""
        async with self._lock:
            now = self._clock()
            self._minute(now)  # a minute with nothing in it is still a minute the pool was up
            horizon = minute_of(now - self.retention)
            for t in [t for t in self._open if t < horizon]:  # kept through a long outage: too old now
                del self._open[t]
            rows = [m.row(t, self._instance, model) for t, models in self._open.items() for model, m in models.items()]
            written = list(self._open)
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        delete(_table).where(and_(_table.c.instance_id == self._instance, _table.c.minute.in_(written)))
                    )
                    await conn.execute(insert(_table), rows)
                    await conn.execute(delete(_table).where(_table.c.minute < horizon))
            except Exception as exc:  # the database is away: keep the minutes for the next flush
                log.error("status history flush failed, will retry", extra={"error": str(exc)})
                return
            current = minute_of(now)
            for t in written:
                if t < current:
                    del self._open[t]

    async def read(self, seconds: int) -> Series:
        """The merged series of the last ``seconds`` (whole minutes), from every process's rows.

        The whole retention is read and merged at most once per ``cache_seconds`` (concurrent
        readers share that read) and each span is cut from it, so no choice of span costs more."""
        since = minute_of(self._clock() - seconds + MINUTE)
        merged = await self._whole()
        return Series(
            since=since,
            pool=[p for p in merged.pool if p.t >= since],
            models={
                model: kept for model, points in merged.models.items() if (kept := [p for p in points if p.t >= since])
            },
        )

    async def _whole(self) -> Series:
        async with self._reading:
            if self._merged is not None and time.monotonic() - self._merged[0] < self._cache_seconds:
                return self._merged[1]
            series = await self._load(minute_of(self._clock() - self.retention + MINUTE))
            self._merged = (time.monotonic(), series)
            return series

    async def _load(self, since: int) -> Series:
        query = select(_table).where(_table.c.minute >= since).order_by(_table.c.minute)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        merged: dict[str, dict[int, Minute]] = {}
        for row in rows:
            into = merged.setdefault(cast(str, row["model"]), {})
            minute = Minute.from_row(dict(row))
            t = cast(int, row["minute"])
            if t in into:
                into[t].merge(minute)
            else:
                into[t] = minute
        points = {model: [m.point(t) for t, m in sorted(minutes.items())] for model, minutes in merged.items()}
        return Series(since=since, pool=points.pop(POOL, []), models=dict(sorted(points.items())))
