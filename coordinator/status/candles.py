"""OHLC candles of a price over time, from offer spans: pure.

The price followed is the lowest blended price (3:1, :func:`shared.money.blend_units`) among the
spans open at each moment: a model's cheapest live offer, or one provider's when only its spans are
given. Each candle covers ``[time, time + interval)``, aligned to the epoch (UTC hours and days):
``open`` is the price at its start (or when offers began within it), ``close`` the last price within
it, ``high`` and ``low`` the extremes. A candle with no offer at any moment has every price ``None``:
a gap shows as a gap, never as a zero."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

import msgspec

from shared.money import blend_units, blended_usd_per_million


class Candle(msgspec.Struct):
    time: int  # unix seconds at the candle's start
    open: float | None  # USD per 1M tokens, blended 3:1
    high: float | None
    low: float | None
    close: float | None
    change_pct: float | None  # (close - open) / open, in percent


class Priced(Protocol):
    """What a candle needs of a span: when it was open and its prices (nano-USD per token)."""

    @property
    def start(self) -> datetime: ...
    @property
    def end(self) -> datetime | None: ...
    @property
    def price_in(self) -> int: ...
    @property
    def price_out(self) -> int: ...


class _Lowest:
    """A multiset of prices with its minimum: a heap with lazy removal."""

    def __init__(self) -> None:
        self._heap: list[int] = []
        self._count: Counter[int] = Counter()

    def add(self, value: int) -> None:
        if self._count[value] == 0:
            heapq.heappush(self._heap, value)
        self._count[value] += 1

    def remove(self, value: int) -> None:
        self._count[value] -= 1

    def lowest(self) -> int | None:
        while self._heap and self._count[self._heap[0]] <= 0:
            del self._count[heapq.heappop(self._heap)]
        return self._heap[0] if self._heap else None


def steps(spans: Iterable[Priced], since: float, until: float) -> list[tuple[float, int | None]]:
    """The lowest price as a step function over ``[since, until)``: ``(time, value)`` at ``since``
    and at every change (``None``: nothing offered)."""
    events: list[tuple[float, int, int]] = []  # (time, +1 open / -1 close, blend units)
    for span in spans:
        start = max(span.start.timestamp(), since)
        end = until if span.end is None else min(span.end.timestamp(), until)
        if start < end:
            value = blend_units(span.price_in, span.price_out)
            events.append((start, 1, value))
            events.append((end, -1, value))
    events.sort()
    lowest = _Lowest()
    points: list[tuple[float, int | None]] = [(since, None)]
    i = 0
    while i < len(events):
        at = events[i][0]
        while i < len(events) and events[i][0] == at:
            _, kind, value = events[i]
            if kind > 0:
                lowest.add(value)
            else:
                lowest.remove(value)
            i += 1
        if at >= until:
            break
        value_now = lowest.lowest()
        if points[-1][0] == at:
            points[-1] = (at, value_now)
        elif points[-1][1] != value_now:
            points.append((at, value_now))
    return points


def candles(spans: Iterable[Priced], since: int, until: float, interval: int) -> list[Candle]:
    """Candles of ``interval`` seconds from ``since`` (a multiple of ``interval``) to ``until``."""
    points = steps(spans, since, until)
    out: list[Candle] = []
    j = 0  # the step in force at the candle's start
    start = since
    while start < until:
        end = start + interval
        while j + 1 < len(points) and points[j + 1][0] <= start:
            j += 1
        values = [points[j][1]]
        k = j + 1
        while k < len(points) and points[k][0] < end:
            values.append(points[k][1])
            k += 1
        offered = [v for v in values if v is not None]
        if not offered:
            out.append(Candle(start, None, None, None, None, None))
        else:
            first, last = offered[0], offered[-1]
            out.append(
                Candle(
                    start,
                    blended_usd_per_million(first),
                    blended_usd_per_million(max(offered)),
                    blended_usd_per_million(min(offered)),
                    blended_usd_per_million(last),
                    round((last - first) * 100 / first, 2) if first else (0.0 if last == first else None),
                )
            )
        start = end
    return out
