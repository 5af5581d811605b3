"""The pool's public overview: the model directory as consumers see it (``/v1/models``) and the
pool's health (``/v1/pool/status``). The API routes and the status page both read these, so they
agree."""

from __future__ import annotations

import msgspec
from redis.exceptions import RedisError

from coordinator.market.auto import AUTO
from coordinator.services.state import PoolState
from coordinator.status.history import MINUTE, StatusPoint
from coordinator.status.stats import Window, merged, window_bytes
from shared.money import blend_units, blended_usd_per_million, nano_per_token_to_usd_per_million
from shared.protocol import KINDS

# ``created`` in the OpenAI model shape: when the model was made. The pool does not know, and a
# process start time would differ between coordinators, so it is 0 (unknown) for every model.
CREATED_UNKNOWN = 0
STATS_TTL = 5.0  # seconds a replica's published window counts after its last publication


class ModelEntry(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    slug: str
    displayName: str
    family: str
    parameterCount: str | None  # the spec's label: "135M", "7B", "1.5B"
    parameterCountExact: int | None  # … and the exact count
    contextWindow: int | None
    useCases: list[str]
    quantizations: list[str]
    aliases: list[str]
    providerCount: int
    minPricePer1mTokensUsd: float | None  # input + output per 1M tokens, the cheapest offer by that sum
    minBlendedPricePer1mTokensUsd: float | None  # (3 * input + output) / 4 per 1M tokens, the cheapest offer
    avgTrustScore: float | None
    fallbackAvailable: bool
    # the job kinds someone serves now (chat, completion, embedding): which endpoints take the model
    kinds: list[str] = []
    dimensions: int | None = None  # an embedding model's vector size


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelEntry]


class ModelStatus(msgspec.Struct):
    modelSlug: str
    providerCount: int
    avgLatencyP95Ms: float | None


class ModelHistory(msgspec.Struct):
    modelSlug: str
    points: list[StatusPoint]


class PoolHistory(msgspec.Struct):
    """Per-minute points, oldest first; a minute no coordinator recorded has no point."""

    bucketSeconds: int
    since: int  # unix seconds at the start of the first minute asked for
    points: list[StatusPoint]  # the whole pool
    byModel: list[ModelHistory]


class PoolStatus(msgspec.Struct, omit_defaults=True):
    """The pool over the last ``windowSeconds`` (10 s more at most). A p95 latency reads as the upper
    edge of its 10 %-wide histogram bucket, capped by the largest latency, as in the history."""

    activeProviders: int
    modelsAvailable: int
    avgLatencyP95Ms: float | None
    fallbackRate: float
    requestsInWindow: int
    windowSeconds: int
    byModel: list[ModelStatus]
    history: PoolHistory | None = None


def parameter_label(count: int | None) -> str | None:
    """A parameter count as the spec labels it: ``135M``, ``7B``, ``1.5B``, ``270M``."""
    if count is None:
        return None
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        value = f"{count / size:.1f}"
        if float(value) >= 1:  # 999,960,000 rounds to 1.0B, never 1000.0M
            return f"{value.removesuffix('.0')}{suffix}"
    return str(count)


def _available(pool: PoolState) -> list[str]:
    return sorted(pool.registry.slugs() | set(pool.upstream.models))


def model_list(pool: PoolState) -> ModelList:
    """Every model the pool serves now, with its directory facts, providers, prices and trust."""
    entries = []
    for slug in _available(pool):
        agents = pool.registry.able(slug, pool.settings.trust_threshold)  # who can serve: what consumers get
        info = pool.directory.get(slug)
        prices = [a.models[slug].price_in + a.models[slug].price_out for a in agents]
        blended = [blend_units(a.models[slug].price_in, a.models[slug].price_out) for a in agents]
        windows = [w for a in agents if (w := a.models[slug].context_window) is not None]
        entries.append(
            ModelEntry(
                id=slug,
                object="model",
                created=CREATED_UNKNOWN,
                owned_by="provider-pool",
                slug=slug,
                displayName=info.display_name if info else slug,
                family=info.family if info else slug.split("-")[0],
                parameterCount=parameter_label(info.parameter_count) if info else None,
                parameterCountExact=info.parameter_count if info else None,
                contextWindow=(info.context_window if info else None) or (min(windows) if windows else None),
                useCases=list(info.use_cases) if info else [],
                quantizations=list(info.quantizations) if info else [],
                aliases=list(info.aliases) if info else [],
                providerCount=len({a.user_id for a in agents}),
                minPricePer1mTokensUsd=nano_per_token_to_usd_per_million(min(prices)) if prices else None,
                minBlendedPricePer1mTokensUsd=blended_usd_per_million(min(blended)) if blended else None,
                avgTrustScore=round(sum(a.trust for a in agents) / len(agents), 1) if agents else None,
                fallbackAvailable=any(pool.upstream.serves(slug, kind) for kind in KINDS),
                kinds=[
                    kind
                    for kind in KINDS
                    if pool.upstream.serves(slug, kind) or any(a.models[slug].serves(kind) for a in agents)
                ],
                dimensions=info.dimensions if info else None,
            )
        )
    if entries:  # ``auto``: the pool picks, per request, the cheapest of these that fits
        providers = {a.user_id for a in pool.registry.able_any(pool.settings.trust_threshold)}
        floors = [e.minPricePer1mTokensUsd for e in entries if e.minPricePer1mTokensUsd is not None]
        blended_floors = [
            e.minBlendedPricePer1mTokensUsd for e in entries if e.minBlendedPricePer1mTokensUsd is not None
        ]
        entries.insert(
            0,
            ModelEntry(
                id=AUTO,
                object="model",
                created=CREATED_UNKNOWN,
                owned_by="provider-pool",
                slug=AUTO,
                displayName="Auto: the cheapest model that fits the request",
                family=AUTO,
                parameterCount=None,
                parameterCountExact=None,
                contextWindow=max((e.contextWindow or 0 for e in entries), default=None) or None,
                useCases=sorted({use for e in entries for use in e.useCases}),
                quantizations=[],
                aliases=[],
                providerCount=len(providers),
                minPricePer1mTokensUsd=min(floors) if floors else None,
                minBlendedPricePer1mTokensUsd=min(blended_floors) if blended_floors else None,
                avgTrustScore=None,
                fallbackAvailable=any(e.fallbackAvailable for e in entries),
            ),
        )
    return ModelList(object="list", data=entries)


async def status_of(pool: PoolState, span: int | None) -> PoolStatus:
    """The pool's health over the recent window, and with ``span`` (seconds) its per-minute history."""
    window = pool_window(pool)
    by_model = []
    for slug in _available(pool):
        model = window.models.get(slug)
        by_model.append(
            ModelStatus(
                modelSlug=slug,
                providerCount=len({a.user_id for a in pool.registry.able(slug, pool.settings.trust_threshold)}),
                avgLatencyP95Ms=model.p95() if model is not None else None,
            )
        )
    past = None
    if span is not None:
        series = await pool.history.read(span)
        past = PoolHistory(
            bucketSeconds=MINUTE,
            since=series.since,
            points=series.pool,
            byModel=[ModelHistory(modelSlug=slug, points=points) for slug, points in series.models.items()],
        )
    return PoolStatus(
        activeProviders=len({a.user_id for a in pool.registry.agents()}),
        modelsAvailable=len(by_model),
        avgLatencyP95Ms=window.pool.p95(),
        fallbackRate=window.fallback_rate,
        requestsInWindow=window.pool.requests,
        windowSeconds=int(pool.stats.window),
        byModel=by_model,
        history=past,
    )


async def share_window(pool: PoolState) -> None:
    """With replicas, once a second: put this replica's recent window where every replica reads it,
    and read every live replica's into ``pool.pool_window`` (``None`` while Redis is away), so a
    status request merges nothing and asks Redis nothing."""
    client, mirror = pool.cluster.client, pool.mirror
    if client is None or mirror is None or pool.replica is None or not pool.cluster.healthy:
        pool.pool_window = None
        return
    try:
        own = window_bytes(pool.stats.recent())
        await client.set(pool.cluster.key("stats", pool.replica), own, px=int(STATS_TTL * 1000))
        alive = await mirror.alive(STATS_TTL)
        published = await client.mget([pool.cluster.key("stats", name) for name in alive]) if alive else []
    except (RedisError, OSError) as exc:
        pool.cluster.failed(exc)
        pool.pool_window = None
        return
    pool.pool_window = merged(raw for raw in published if isinstance(raw, bytes))


def pool_window(pool: PoolState) -> Window:
    """The recent window of the whole pool: every live replica's, as last read (so every replica
    answers the same), or this process's own without replicas or while Redis is away."""
    if pool.pool_window is not None and pool.cluster.healthy:
        return pool.pool_window
    return pool.stats.recent()
