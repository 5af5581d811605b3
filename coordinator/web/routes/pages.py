"""The public pages: the status page ``/status`` (``/`` leads there) and ``/status/live``, the
fragment its script swaps in every few seconds, with the provider directory; a model's page
``/models/{slug}`` (its price history and offers) and a provider's ``/providers/{slug}``. Numbers
come from the same functions as the API (``/v1/pool/status``, ``/v1/models``, ``/v1/providers``,
``/v1/prices``, ``/v1/history``), through the same view cache and per-address limit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from litestar import Request, get
from litestar.response import Redirect, Template

from coordinator.core.errors import PoolError
from coordinator.services import board
from coordinator.services.board import BLEND, HOUR
from coordinator.services.overview import model_list, status_of
from coordinator.services.state import PoolState
from coordinator.status.history import MINUTE
from coordinator.web import charts
from coordinator.web.guards import limit_public
from coordinator.web.portal_cookies import base_context, page_headers
from coordinator.web.templating import ms
from shared import errors

DAY = 86_400


@dataclass(frozen=True, slots=True)
class ModelRow:
    slug: str
    name: str
    providers: int
    min_price: float | None  # blended 3:1 per 1M tokens
    trust: float | None
    p95: float | None
    fallback: bool


async def status_context(pool: PoolState) -> dict[str, Any]:
    span = int(min(DAY, pool.history.retention) // MINUTE * MINUTE)
    status = await status_of(pool, span)
    assert status.history is not None
    points = status.history.points
    now = time.time()
    start = float(status.history.since)
    hour = (now - 3600 + MINUTE) // MINUTE * MINUTE
    p95 = {m.modelSlug: m.avgLatencyP95Ms for m in status.byModel}
    models = [
        ModelRow(
            slug=m.slug,
            name=m.displayName,
            providers=m.providerCount,
            min_price=m.minBlendedPricePer1mTokensUsd,
            trust=m.avgTrustScore,
            p95=p95.get(m.slug),
            fallback=m.fallbackAvailable,
        )
        for m in model_list(pool).data
    ]
    served = [(p.t, p.fallbackRate * 100 if p.requests else None) for p in points]
    return {
        "providers": (await board.provider_list(pool)).data,
        "status": status,
        "models": models,
        "last_hour": sum(p.requests for p in points if p.t >= hour),
        "window": _duration(status.windowSeconds),
        "updated": charts.clock(now),
        "refresh": max(1, round(pool.settings.status_flush_seconds)),
        "charts": [
            charts.timeline("Active providers", [(p.t, p.activeProviders) for p in points], start, now, _count),
            charts.timeline("Requests per minute", [(p.t, p.requests) for p in points], start, now, _count),
            charts.timeline("p95 latency (ms)", [(p.t, p.p95LatencyMs) for p in points], start, now, ms),
            charts.timeline("Fallback rate (%)", served, start, now, _percent),
        ],
    }


def _duration(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _percent(value: float) -> str:
    return f"{value:.1f} %"


@get("/", include_in_schema=False)
async def root() -> Redirect:
    return Redirect("/status")


async def _status(pool: PoolState) -> dict[str, Any]:
    return await pool.views.get("status-page", None, lambda: status_context(pool))


@get(
    "/status",
    summary="The pool's status page (HTML)",
    tags=["pages"],
    response_headers=page_headers("no-cache"),
    guards=[limit_public],
)
async def status_page(request: Request[Any, Any, Any], pool: PoolState) -> Template:
    context = {**base_context(request, "status"), **await _status(pool)}
    return Template("status.html", context=context)


@get(
    "/status/live",
    summary="The changing part of the status page, as an HTML fragment",
    tags=["pages"],
    response_headers=page_headers("no-cache"),
    guards=[limit_public],
)
async def status_live(pool: PoolState) -> Template:
    return Template("_status_live.html", context=await _status(pool))


async def model_context(pool: PoolState, slug: str) -> dict[str, Any]:
    """A model's page: its directory entry, a week of its lowest blended price, its offers."""
    history = await board.price_history(pool, slug, None, 7, "1h")
    now = time.time()
    entry = next((m for m in model_list(pool).data if m.slug == slug), None)
    points = [(c.time, c.close) for c in history.candles]
    chart = charts.timeline(
        "Lowest blended price, USD per 1M tokens (hourly close)", points, history.candles[0].time, now, _usd, HOUR
    )
    return {"slug": slug, "entry": entry, "chart": chart, "offers": board.live_offers(pool, slug), "blend": BLEND}


@get(
    "/models/{slug:str}",
    summary="A model's page: price history and live offers (HTML)",
    tags=["pages"],
    response_headers=page_headers("no-cache"),
    guards=[limit_public],
)
async def model_page(request: Request[Any, Any, Any], pool: PoolState, slug: str) -> Template:
    found = board.known_model(pool, slug)
    if found is None:
        raise PoolError(404, errors.MODEL_NOT_FOUND, f"The model {slug!r} is not known to the pool.")
    context = await pool.views.get("model-page", found, lambda: model_context(pool, found))
    return Template("model.html", context={**base_context(request, "status"), **context})


@get(
    "/providers/{slug:str}",
    summary="A provider's public page (HTML)",
    tags=["pages"],
    response_headers=page_headers("no-cache"),
    guards=[limit_public],
)
async def provider_page(request: Request[Any, Any, Any], pool: PoolState, slug: str) -> Template:
    profile = pool.providers.find(slug)
    if profile is None:
        raise PoolError(404, errors.NOT_FOUND, f"No provider has the slug {slug!r}.")
    detail = await pool.views.get("provider", profile.user_id, lambda: board.provider_detail(pool, profile.slug))
    return Template("provider.html", context={**base_context(request, "status"), "provider": detail, "blend": BLEND})


def _usd(value: float) -> str:
    return f"${value:,.4f}".rstrip("0").rstrip(".") if value else "$0"
