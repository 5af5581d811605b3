"""The per-minute status history's latency histogram: its p95, and merged minutes."""

from __future__ import annotations

from coordinator.status import history
from coordinator.status.history import Minute


def test_p95_from_the_histogram_is_within_a_bucket_of_the_exact_one() -> None:
    minute = Minute()
    for ms in range(1, 101):
        minute.add(float(ms), fallback=False, ok=True)
    assert 95 <= minute.p95() <= 95 * history.GROWTH  # type: ignore[operator]
    single = Minute()
    single.add(123.4, fallback=False, ok=True)
    assert single.p95() == 123.4  # capped by the largest latency, so one request reads exactly
    failed = Minute()
    failed.add(5000, fallback=True, ok=False)
    assert (failed.requests, failed.p95(), failed.point(0).fallbackRate) == (1, None, 0.0)


def test_merged_minutes_give_the_p95_of_all_their_requests() -> None:
    a, b = Minute(), Minute()
    for ms in range(1, 51):
        a.add(float(ms), fallback=False, ok=True)
    for ms in range(51, 101):
        b.add(float(ms), fallback=ms > 90, ok=True)
    a.merge(b)
    point = a.point(60)
    assert (point.requests, point.fallbackRate) == (100, 0.1)
    assert 95 <= point.p95LatencyMs <= 95 * history.GROWTH  # type: ignore[operator]
