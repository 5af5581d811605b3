"""Rolling-window request statistics behind ``/v1/pool/status``, kept in memory."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    slug: str
    latency_ms: float
    fallback: bool
    ok: bool


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile, or ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class RequestStats:
    def __init__(self, window_seconds: float) -> None:
        self.window = window_seconds
        self._samples: deque[Sample] = deque()

    def record(self, slug: str, latency_ms: float, *, fallback: bool, ok: bool) -> None:
        self._samples.append(Sample(time.monotonic(), slug, latency_ms, fallback, ok))

    def recent(self) -> list[Sample]:
        """Samples inside the window (older ones are dropped)."""
        horizon = time.monotonic() - self.window
        while self._samples and self._samples[0].at < horizon:
            self._samples.popleft()
        return list(self._samples)
