"""The rolling window behind ``/v1/pool/status``: requests added up in slots, old slots forgotten."""

from __future__ import annotations

import pytest

from coordinator.status import stats


def test_request_stats_add_up_in_slots_and_forget_old_ones() -> None:
    clock = [1000.0]
    window = stats.RequestStats(60, clock=lambda: clock[0])
    for ms in range(1, 101):  # 1..100 ms, served by agents
        window.record("a", float(ms), fallback=False, ok=True)
    window.record("b", 500.0, fallback=True, ok=True)
    window.record("b", 9000.0, fallback=False, ok=False)  # failed: counted, but not in latency or fallbacks
    now = window.recent()
    assert (now.pool.requests, now.pool.served, now.pool.fallbacks) == (102, 101, 1)
    assert now.fallback_rate == pytest.approx(1 / 101)
    p95 = now.models["a"].p95()
    assert p95 is not None and 95 <= p95 <= 95 * 1.1  # the upper edge of its 10 % bucket
    assert now.models["b"].p95() == 500.0  # capped by the largest latency

    clock[0] += 30  # a later slot, still inside the window
    window.record("a", 5.0, fallback=False, ok=True)
    assert window.recent().pool.requests == 103
    clock[0] += 45  # the first slot has left the window, the second has not
    later = window.recent()
    assert (later.pool.requests, set(later.models)) == (1, {"a"})
    clock[0] += 60
    assert window.recent().pool.requests == 0
