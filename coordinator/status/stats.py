"""Rolling-window request statistics behind ``/v1/pool/status``, kept in memory.

Requests are added up in 10-second slots — count, fallbacks and a latency histogram, per model and
for the whole pool, as the per-minute history adds them up (:class:`coordinator.status.history.Minute`) —
so their memory and the cost of reading them stay the same whatever the traffic. (Keeping every
request for the 15-minute window held millions of objects at a few thousand requests a second, and
the garbage collector's full passes over them stalled the event loop for 50-130 ms.) The window
therefore reaches back between ``window_seconds`` and one slot more.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from coordinator.status.history import Minute

SLOT = 10  # seconds


@dataclass(slots=True)
class Window:
    """Requests of the recent window: for the whole pool, and by model."""

    pool: Minute = field(default_factory=Minute)
    models: dict[str, Minute] = field(default_factory=dict)

    def add(self, slug: str, latency_ms: float, *, fallback: bool, ok: bool) -> None:
        self.pool.add(latency_ms, fallback=fallback, ok=ok)
        model = self.models.get(slug)
        if model is None:
            model = self.models[slug] = Minute()
        model.add(latency_ms, fallback=fallback, ok=ok)

    def merge(self, other: Window) -> None:
        self.pool.merge(other.pool)
        for slug, minute in other.models.items():
            self.models.setdefault(slug, Minute()).merge(minute)

    @property
    def fallback_rate(self) -> float:
        """Share of the requests that ended well which the platform upstream served."""
        return self.pool.fallbacks / self.pool.served if self.pool.served else 0.0


class RequestStats:
    def __init__(self, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window_seconds
        self._clock = clock
        self._slots: deque[tuple[int, Window]] = deque()  # (slot start, its requests), oldest first

    def record(self, slug: str, latency_ms: float, *, fallback: bool, ok: bool) -> None:
        start = int(self._clock() // SLOT) * SLOT
        if not self._slots or self._slots[-1][0] != start:
            self._slots.append((start, Window()))
        self._slots[-1][1].add(slug, latency_ms, fallback=fallback, ok=ok)

    def recent(self) -> Window:
        """The requests of the slots inside the window (older slots are dropped)."""
        horizon = self._clock() - self.window
        while self._slots and self._slots[0][0] + SLOT <= horizon:
            self._slots.popleft()
        total = Window()
        for _, window in self._slots:
            total.merge(window)
        return total


# With replicas each publishes its window (``services/periodic.py``) and the status merges them all.
_Figures = tuple[int, int, int, dict[int, int], float]  # a Minute without its providers
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(tuple[_Figures, dict[str, _Figures]])


def _figures(minute: Minute) -> _Figures:
    return (minute.requests, minute.served, minute.fallbacks, dict(minute.latency), minute.max_ms)


def _minute(figures: _Figures) -> Minute:
    requests, served, fallbacks, latency, max_ms = figures
    return Minute(requests, served, fallbacks, Counter(latency), max_ms)


def window_bytes(window: Window) -> bytes:
    return _encoder.encode((_figures(window.pool), {slug: _figures(m) for slug, m in window.models.items()}))


def merged(published: Iterable[bytes]) -> Window:
    """The pool's window from the replicas' published ones (unreadable ones are skipped)."""
    total = Window()
    for raw in published:
        try:
            pool, models = _decoder.decode(raw)
        except msgspec.ValidationError:
            continue
        total.merge(Window(_minute(pool), {slug: _minute(m) for slug, m in models.items()}))
    return total
