"""Public directory and pool health: ``GET /v1/models`` and ``GET /v1/pool/status``."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, get

from coordinator.state import PoolState
from coordinator.stats import p95
from shared.money import nano_per_token_to_usd_per_million

STARTED = int(time.time())


class ModelEntry(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    slug: str
    displayName: str
    family: str
    parameterCount: int | None
    contextWindow: int | None
    useCases: list[str]
    quantizations: list[str]
    aliases: list[str]
    providerCount: int
    minPricePer1mTokensUsd: float | None
    avgTrustScore: float | None
    fallbackAvailable: bool


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelEntry]


class ModelStatus(msgspec.Struct):
    modelSlug: str
    providerCount: int
    avgLatencyP95Ms: float | None


class PoolStatus(msgspec.Struct):
    activeProviders: int
    modelsAvailable: int
    avgLatencyP95Ms: float | None
    fallbackRate: float
    requestsInWindow: int
    windowSeconds: int
    byModel: list[ModelStatus]


def _available(pool: PoolState) -> list[str]:
    return sorted(pool.registry.slugs() | set(pool.upstream.models))


@get("/v1/models", summary="List the models the pool serves", tags=["directory"])
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    pool: PoolState = request.app.state.pool
    entries = []
    for slug in _available(pool):
        agents = pool.registry.serving(slug)
        info = pool.directory.get(slug)
        prices = [a.models[slug].price_in + a.models[slug].price_out for a in agents]
        windows = [w for a in agents if (w := a.models[slug].context_window) is not None]
        entries.append(
            ModelEntry(
                id=slug,
                object="model",
                created=STARTED,
                owned_by="provider-pool",
                slug=slug,
                displayName=info.display_name if info else slug,
                family=info.family if info else slug.split("-")[0],
                parameterCount=info.parameter_count if info else None,
                contextWindow=(info.context_window if info else None) or (min(windows) if windows else None),
                useCases=list(info.use_cases) if info else [],
                quantizations=list(info.quantizations) if info else [],
                aliases=list(info.aliases) if info else [],
                providerCount=len({a.user_id for a in agents}),
                minPricePer1mTokensUsd=nano_per_token_to_usd_per_million(min(prices)) if prices else None,
                avgTrustScore=round(sum(a.trust for a in agents) / len(agents), 1) if agents else None,
                fallbackAvailable=pool.upstream.serves(slug),
            )
        )
    return ModelList(object="list", data=entries)


@get("/v1/pool/status", summary="Pool health over the recent window", tags=["directory"])
async def pool_status(request: Request[Any, Any, Any]) -> PoolStatus:
    pool: PoolState = request.app.state.pool
    samples = pool.stats.recent()
    by_model = []
    for slug in _available(pool):
        latencies = [s.latency_ms for s in samples if s.slug == slug and s.ok]
        by_model.append(
            ModelStatus(
                modelSlug=slug,
                providerCount=len({a.user_id for a in pool.registry.serving(slug)}),
                avgLatencyP95Ms=p95(latencies),
            )
        )
    served = [s for s in samples if s.ok]
    return PoolStatus(
        activeProviders=len({a.user_id for a in pool.registry.agents()}),
        modelsAvailable=len(by_model),
        avgLatencyP95Ms=p95([s.latency_ms for s in served]),
        fallbackRate=(sum(s.fallback for s in served) / len(served)) if served else 0.0,
        requestsInWindow=len(samples),
        windowSeconds=int(pool.stats.window),
        byModel=by_model,
    )
