"""The open price board: providers and their public faces, every live offer with its prices, price
history as candles, and models side by side. Everything here is public, so every view is computed
through :class:`~coordinator.core.viewcache.ViewCache` (at most once per interval however many ask).

Prices are USD per 1M tokens; ``blended_per_1m`` weighs input and output 3:1
(:data:`BLEND`). Offers come from the registry (every replica's agents), history and uptime from
the offer spans (:mod:`coordinator.status.offerlog`)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from coordinator.identity.providers import Profile
from coordinator.market.registry import ConnectedAgent
from coordinator.services.overview import pool_window
from coordinator.services.state import PoolState
from coordinator.status.candles import Candle, candles
from shared.money import blend_units, blended_usd_per_million, nano_per_token_to_usd_per_million

BLEND = "blended_per_1m = (3 * input_per_1m + output_per_1m) / 4: a 3:1 mix of input and output tokens"
HOUR, DAY = 3600, 86_400
INTERVALS = {"1h": HOUR, "1d": DAY}
MAX_COMPARED = 5
MAX_HOURLY_DAYS = 31  # hourly candles reach this far back (744 of them): a bounded value to cache
LIVE, STALE, IDLE, OFFLINE = "live", "stale", "idle", "offline"
Uptimes = dict[int, tuple[list[tuple[float, float]], float]]  # provider -> (intervals with an offer, as of)


class PriceOffer(msgspec.Struct):
    """One provider's offer of one model at one price (its agents offering it alike, together)."""

    provider: str  # the provider's slug
    provider_name: str
    provider_id: int
    model: str
    quantization: str
    input_per_1m: float  # USD per 1M input tokens
    output_per_1m: float
    blended_per_1m: float  # (3 * input + output) / 4
    context_window: int | None
    agents: int  # agents offering it
    status: str  # live: taking traffic now; stale: connected, but draining, distrusted or silent
    updated_at: str  # when the price was set (the newest of its agents' announcements), UTC ISO 8601


class PriceList(msgspec.Struct):
    object: str
    blend: str
    data: list[PriceOffer]


class ProviderEntry(msgspec.Struct, kw_only=True):
    slug: str
    name: str
    website: str | None
    description: str | None
    models: list[str]  # offered now
    status: str  # live: takes traffic; idle: connected, takes none (draining, under the trust floor); offline
    trust: float | None  # its best connected agent's score; None while offline
    uptime_24h: float | None  # share of the last 24 h (or since joining) with an agent connected, 0-1
    uptime_7d: float | None
    joined_at: str  # when its first agent connected, UTC ISO 8601


class ProviderList(msgspec.Struct):
    object: str
    data: list[ProviderEntry]


class ProviderDetail(ProviderEntry, kw_only=True):
    offers: list[PriceOffer]


class PriceHistory(msgspec.Struct):
    model: str
    provider: str | None  # one provider's price, or (None) the model's lowest live price
    interval: str
    days: int
    blend: str
    candles: list[Candle]  # oldest first; a candle with null prices: nothing was offered


class ModelComparison(msgspec.Struct):
    model: str
    cheapest_provider: str | None  # slug
    cheapest_provider_name: str | None
    cheapest_blended_per_1m: float | None
    average_blended_per_1m: float | None  # over providers, each at its cheapest live offer
    provider_count: int
    context_window: int | None
    p95_latency_ms: float | None  # over the status window
    fallback_available: bool


class Comparison(msgspec.Struct):
    object: str
    blend: str
    data: list[ModelComparison]


def iso(at: datetime | float) -> str:
    moment = at if isinstance(at, datetime) else datetime.fromtimestamp(at, UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _unread(pool: PoolState, user_id: int) -> Profile | None:
    """A connected provider whose profile this process has not read yet: its defaults."""
    if any(agent.user_id == user_id for agent in pool.registry.agents()):
        return profile_of(pool, user_id)
    return None


def profile_of(pool: PoolState, user_id: int) -> Profile:
    """A provider's profile, or its defaults while this process has not read it yet."""
    found = pool.providers.get(user_id)
    if found is not None:
        return found
    return Profile(user_id, f"provider-{user_id}", f"Provider {user_id}", None, None, datetime.fromtimestamp(0, UTC))


def _takes_traffic(pool: PoolState, agent: ConnectedAgent, now: float) -> bool:
    silent = agent.local and agent.last_seen < now - 2 * pool.settings.heartbeat_interval
    return not agent.draining and agent.trust >= pool.settings.trust_threshold and not silent


def live_offers(pool: PoolState, model: str | None = None, user_id: int | None = None) -> list[PriceOffer]:
    """Every offer in the pool now, cheapest first within each model."""
    now = time.monotonic()
    grouped: dict[tuple[int, str, str, int, int, int | None], list[ConnectedAgent]] = defaultdict(list)
    for agent in pool.registry.agents():
        if user_id is not None and agent.user_id != user_id:
            continue
        for slug, offer in agent.models.items():
            if model is not None and slug != model:
                continue
            key = (agent.user_id, slug, offer.quantization, offer.price_in, offer.price_out, offer.context_window)
            grouped[key].append(agent)
    offers = []
    for (owner, slug, quantization, price_in, price_out, window), agents in grouped.items():
        profile = profile_of(pool, owner)
        info = pool.directory.get(slug)
        offers.append(
            PriceOffer(
                provider=profile.slug,
                provider_name=profile.name,
                provider_id=owner,
                model=slug,
                quantization=quantization or "unknown",
                input_per_1m=nano_per_token_to_usd_per_million(price_in),
                output_per_1m=nano_per_token_to_usd_per_million(price_out),
                blended_per_1m=blended_usd_per_million(blend_units(price_in, price_out)),
                context_window=window or (info.context_window if info else None),
                agents=len(agents),
                status=LIVE if any(_takes_traffic(pool, a, now) for a in agents) else STALE,
                updated_at=iso(max(a.since for a in agents)),
            )
        )
    offers.sort(key=lambda o: (o.model, o.blended_per_1m, o.provider, o.quantization))
    return offers


async def price_list(pool: PoolState, model: str | None, user_id: int | None) -> PriceList:
    return PriceList("list", BLEND, live_offers(pool, model, user_id))


# --- providers ---------------------------------------------------------------------------------


def _covered(intervals: Iterable[tuple[float, float]], since: float, until: float) -> float:
    """Seconds of ``[since, until)`` inside the union of ``intervals``."""
    total, reach = 0.0, since
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, until)
        if end > start:
            total += end - start
            reach = end
    return total


async def _uptimes(pool: PoolState, user_id: int | None = None) -> Uptimes:
    """Per provider (or for one): the intervals with an offer over the last 7 days, from the spans
    and the agents connected now (whose spans may not be written yet)."""
    now = time.time()
    since = now - 7 * DAY
    window = (datetime.fromtimestamp(since, UTC), datetime.fromtimestamp(now, UTC))
    spans = await pool.offer_log.spans(*window, user_id=user_id)
    found: Uptimes = {}
    for span in spans:
        intervals, _ = found.setdefault(span.user_id, ([], now))
        intervals.append((span.start.timestamp(), now if span.end is None else span.end.timestamp()))
    for agent in pool.registry.agents():
        if user_id is None or agent.user_id == user_id:
            intervals, _ = found.setdefault(agent.user_id, ([], now))
            intervals.append((agent.since, now))
    return found


def _uptime(intervals: list[tuple[float, float]], joined: float, period: float, now: float) -> float | None:
    since = max(now - period, joined)
    if now - since < 1:
        return None
    return round(_covered(intervals, since, now) / (now - since), 4)


def _entry(pool: PoolState, profile: Profile, uptimes: Uptimes) -> dict[str, Any]:
    now = time.time()
    mono = time.monotonic()
    agents = [a for a in pool.registry.agents() if a.user_id == profile.user_id]
    intervals = uptimes.get(profile.user_id, ([], now))[0]
    joined = profile.joined_at.timestamp()
    status = OFFLINE
    if agents:
        status = LIVE if any(_takes_traffic(pool, a, mono) for a in agents) else IDLE
    return {
        "slug": profile.slug,
        "name": profile.name,
        "website": profile.website,
        "description": profile.description,
        "models": sorted({slug for a in agents for slug in a.models}),
        "status": status,
        "trust": round(max(a.trust for a in agents), 1) if agents else None,
        "uptime_24h": _uptime(intervals, joined, DAY, now),
        "uptime_7d": _uptime(intervals, joined, 7 * DAY, now),
        "joined_at": iso(profile.joined_at),
    }


async def provider_list(pool: PoolState) -> ProviderList:
    """Every provider that offered something in the last 7 days, live ones first, then by name
    (``/v1/providers/{slug}`` still answers for the others)."""
    uptimes = await _uptimes(pool)
    active = [p for user_id in uptimes if (p := pool.providers.get(user_id) or _unread(pool, user_id)) is not None]
    entries = [ProviderEntry(**_entry(pool, p, uptimes)) for p in active]
    order = {LIVE: 0, IDLE: 1, OFFLINE: 2}
    entries.sort(key=lambda e: (order[e.status], e.name.casefold()))
    return ProviderList("list", entries)


async def provider_detail(pool: PoolState, slug: str) -> ProviderDetail | None:
    profile = pool.providers.find(slug)
    if profile is None:
        return None
    uptimes = await _uptimes(pool, profile.user_id)
    return ProviderDetail(**_entry(pool, profile, uptimes), offers=live_offers(pool, user_id=profile.user_id))


# --- history -----------------------------------------------------------------------------------


def known_model(pool: PoolState, name: str) -> str | None:
    """The model's slug if the pool knows it (its directory, an agent's offer, the upstream)."""
    if pool.directory.get(name) is not None or name in pool.registry.slugs() or pool.upstream.serves(name):
        return name
    resolved = pool.directory.resolve(name)
    return resolved[0] if resolved is not None else None


async def price_history(pool: PoolState, model: str, profile: Profile | None, days: int, interval: str) -> PriceHistory:
    step = INTERVALS[interval]
    now = time.time()
    since = int((now - days * DAY) // step * step)
    spans = await pool.offer_log.spans(
        datetime.fromtimestamp(since, UTC),
        datetime.fromtimestamp(now, UTC),
        model=model,
        user_id=profile.user_id if profile is not None else None,
    )
    return PriceHistory(
        model=model,
        provider=profile.slug if profile is not None else None,
        interval=interval,
        days=days,
        blend=BLEND,
        candles=candles(spans, since, now, step),
    )


# --- compare -----------------------------------------------------------------------------------


def compare(pool: PoolState, models: list[str]) -> Comparison:
    """The given models side by side (known models, at most :data:`MAX_COMPARED`)."""
    window = pool_window(pool)
    rows = []
    for slug in models:
        live = [o for o in live_offers(pool, slug) if o.status == LIVE]
        cheapest_per_provider: dict[int, PriceOffer] = {}
        for offer in live:  # cheapest first
            cheapest_per_provider.setdefault(offer.provider_id, offer)
        best = live[0] if live else None
        info = pool.directory.get(slug)
        prices = [o.blended_per_1m for o in cheapest_per_provider.values()]
        windows = [o.context_window for o in live if o.context_window is not None]
        stats = window.models.get(slug)
        rows.append(
            ModelComparison(
                model=slug,
                cheapest_provider=best.provider if best else None,
                cheapest_provider_name=best.provider_name if best else None,
                cheapest_blended_per_1m=best.blended_per_1m if best else None,
                average_blended_per_1m=round(sum(prices) / len(prices), 6) if prices else None,
                provider_count=len(cheapest_per_provider),
                context_window=(info.context_window if info else None) or (min(windows) if windows else None),
                p95_latency_ms=stats.p95() if stats is not None else None,
                fallback_available=pool.upstream.serves(slug),
            )
        )
    return Comparison("list", BLEND, rows)
