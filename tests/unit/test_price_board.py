"""The price board's pure parts: candles from spans (open, high, low, close, gaps), the blended
price's arithmetic, parameter-count labels, profile validation, and the view cache's one
computation for many concurrent askers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from coordinator.core.viewcache import ViewCache
from coordinator.identity.providers import (
    Profile,
    ProfileError,
    ProviderBook,
    check_description,
    check_name,
    check_slug,
    check_website,
    name_key,
)
from coordinator.services.board import _covered
from coordinator.services.overview import parameter_label
from coordinator.status.candles import candles, steps
from shared.money import blend_units, blended_usd_per_million

H = 3600
BASE = 1_700_000_000 // H * H


@dataclass(frozen=True)
class S:
    start: datetime
    end: datetime | None
    price_in: int
    price_out: int


def span(start_h: float, end_h: float | None, price_in: int, price_out: int) -> S:
    def at(hours: float) -> datetime:
        return datetime.fromtimestamp(BASE + hours * H, UTC)

    return S(at(start_h), None if end_h is None else at(end_h), price_in, price_out)


def ohlc(candle: object) -> tuple[object, ...]:
    return tuple(getattr(candle, field) for field in ("open", "high", "low", "close", "change_pct"))


def test_blended_price_is_three_parts_input_one_part_output() -> None:
    assert blend_units(100, 200) == 500
    assert blended_usd_per_million(blend_units(100, 200)) == 0.125  # (3 * 0.1 + 0.2) / 4 per 1M
    assert blended_usd_per_million(blend_units(1, 0)) == 0.00075  # exact, not rounded to cents
    assert blended_usd_per_million(0) == 0.0


def test_candles_follow_the_lowest_offer_and_show_gaps() -> None:
    spans = [
        span(0, 2.5, 100, 200),  # $0.125
        span(1.25, 1.75, 80, 80),  # $0.08, undercuts for half an hour
        span(1.5, 1.6, 60, 60),  # $0.06 within that
        span(4.5, None, 200, 400),  # $0.25 from 4:30, still open
        span(4.75, 5.5, 400, 400),  # dearer than the lowest: never shows
    ]
    out = candles(spans, BASE - H, BASE + 6.5 * H, H)
    assert [c.time for c in out] == [BASE + n * H for n in range(-1, 7)]
    assert ohlc(out[0]) == (None, None, None, None, None)
    assert ohlc(out[1]) == (0.125, 0.125, 0.125, 0.125, 0.0)
    assert ohlc(out[2]) == (0.125, 0.125, 0.06, 0.125, 0.0)
    assert ohlc(out[3]) == (0.125, 0.125, 0.125, 0.125, 0.0)
    assert ohlc(out[4]) == (None, None, None, None, None)
    assert ohlc(out[5]) == (0.25, 0.25, 0.25, 0.25, 0.0)
    assert ohlc(out[7]) == (0.25, 0.25, 0.25, 0.25, 0.0)  # the partial candle up to ``until``


def test_a_candle_moves_with_the_price_and_reports_its_change() -> None:
    spans = [span(0, 0.5, 100, 100), span(0.5, None, 150, 150)]  # $0.1, then $0.15
    (candle,) = candles(spans, BASE, BASE + H, H)
    assert ohlc(candle) == (0.1, 0.15, 0.1, 0.15, 50.0)
    falling = candles([span(0, 0.5, 200, 200), span(0.25, None, 50, 50)], BASE, BASE + H, H)[0]
    assert ohlc(falling) == (0.2, 0.2, 0.05, 0.05, -75.0)
    free = candles([span(0, None, 0, 0)], BASE, BASE + H, H)[0]
    assert ohlc(free) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_steps_merge_simultaneous_changes() -> None:
    handover = [span(0, 1, 100, 100), span(1, 2, 100, 100)]  # one leaves as another comes, same price
    assert steps(handover, BASE, BASE + 3 * H) == [(BASE, 400), (BASE + 2 * H, None)]
    assert steps([], BASE, BASE + H) == [(BASE, None)]
    assert candles([], BASE, BASE + 2 * H, H) == [
        candles([], BASE, BASE + H, H)[0],
        candles([], BASE + H, BASE + 2 * H, H)[0],
    ]


def test_uptime_counts_the_union_of_intervals() -> None:
    assert _covered([(0, 10), (5, 15), (20, 30)], 0, 40) == 25
    assert _covered([(-10, 5)], 0, 10) == 5
    assert _covered([], 0, 10) == 0


def test_parameter_counts_are_labelled_as_the_spec_writes_them() -> None:
    assert parameter_label(135_000_000) == "135M"
    assert parameter_label(270_000_000) == "270M"
    assert parameter_label(7_000_000_000) == "7B"
    assert parameter_label(1_500_000_000) == "1.5B"
    assert parameter_label(7_615_000_000) == "7.6B"
    assert parameter_label(None) is None


def test_profiles_are_checked() -> None:
    assert check_slug(" Alpha-GPU ", 7) == "alpha-gpu"
    assert check_slug("provider-7", 7) == "provider-7"  # one's own default
    for bad in ("", "-a", "a-", "a_b", "12345", "a" * 41, "platform", "provider-8", "ünï"):
        with pytest.raises(ProfileError) as refused:
            check_slug(bad, 7)
        assert refused.value.field == "slug"
    assert check_name("  Alpha   GPU ", 7) == "Alpha GPU"
    assert check_name("Лиссабон GPU", 7) == "Лиссабон GPU"  # one script per word is fine

    assert name_key("Alpha GPU") == name_key("alpha-gpu!") == name_key("\uff21lpha GPU") == "alphagpu"
    for bad in ("a", "--", "Provider 8", "x" * 61, "bell\x07name", "\u0410lpha GPU"):  # (a Cyrillic capital A)
        with pytest.raises(ProfileError):
            check_name(bad, 7)
    assert check_website("https://alpha.example/gpu") == "https://alpha.example/gpu"
    assert check_website("  ") is None
    for bad in ("javascript:alert(1)", "https://user:pw@alpha.example", "ftp://alpha.example", "https://localhost"):
        with pytest.raises(ProfileError):
            check_website(bad)
    assert check_description("Two 4090s.\nIn Lisbon.") == "Two 4090s.\nIn Lisbon."
    with pytest.raises(ProfileError):
        check_description("bell\x07")


def test_old_slugs_keep_naming_their_provider() -> None:
    book = ProviderBook()
    book.put(Profile(7, "alpha", "Alpha", None, None, datetime.now(UTC)))
    book.put(Profile(7, "alpha-gpu", "Alpha", None, None, datetime.now(UTC)))
    assert book.resolve("alpha") == book.resolve("ALPHA-GPU") == "7"
    assert book.resolve("agt_0123") == "agt_0123" and book.resolve("platform") == "platform"
    found = book.find("alpha")
    assert found is not None and found.slug == "alpha-gpu"


async def test_the_view_cache_computes_once_for_many_concurrent_askers() -> None:
    now = [0.0]
    cache = ViewCache(2.0, clock=lambda: now[0])
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return calls

    values = await asyncio.gather(*(cache.get("status", None, compute) for _ in range(1000)))
    assert set(values) == {1} and calls == 1 and cache.computations["status"] == 1
    now[0] = 1.9
    assert await cache.get("status", None, compute) == 1  # still fresh
    now[0] = 2.1
    assert await cache.get("status", None, compute) == 2  # expired: computed again, once
    assert await cache.get("status", "24h", compute) == 3  # another key is another value


async def test_a_failed_computation_is_not_kept_and_a_leaving_client_cancels_nothing() -> None:
    cache = ViewCache(2.0)
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise RuntimeError("database away")
        return "ok"

    with pytest.raises(RuntimeError):
        await cache.get("prices", None, flaky)
    assert await cache.get("prices", None, flaky) == "ok"

    async def slow() -> str:
        await asyncio.sleep(0.05)
        return "done"

    first = asyncio.create_task(cache.get("history", 1, slow))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.get("history", 1, slow))
    await asyncio.sleep(0.01)
    first.cancel()  # the client that started it left
    assert await second == "done" and cache.computations["history"] == 1


def test_the_cache_forgets_the_least_recently_used_keys() -> None:
    async def run() -> int:
        cache = ViewCache(60.0, max_entries=3)

        async def value() -> int:
            return 1

        for key in range(10):
            await cache.get("history", key, value)
        return len(cache._entries)

    assert asyncio.run(run()) == 3
