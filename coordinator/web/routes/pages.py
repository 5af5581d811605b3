"""The public status page: ``/status`` (``/`` leads there) and ``/status/live``, the fragment its
script swaps in every few seconds. Numbers come from the same functions as ``/v1/pool/status`` and
``/v1/models``, so the page and the API agree."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from litestar import Request, get
from litestar.response import Redirect, Template

from coordinator.services.overview import model_list, status_of
from coordinator.services.state import PoolState
from coordinator.status.history import MINUTE
from coordinator.web import charts
from coordinator.web.portal_cookies import base_context, page_headers
from coordinator.web.templating import ms

DAY = 86_400


@dataclass(frozen=True, slots=True)
class ModelRow:
    slug: str
    name: str
    providers: int
    min_price: float | None
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
            min_price=m.minPricePer1mTokensUsd,
            trust=m.avgTrustScore,
            p95=p95.get(m.slug),
            fallback=m.fallbackAvailable,
        )
        for m in model_list(pool).data
    ]
    served = [(p.t, p.fallbackRate * 100 if p.requests else None) for p in points]
    return {
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


@get("/status", summary="The pool's status page (HTML)", tags=["pages"], response_headers=page_headers("no-cache"))
async def status_page(request: Request[Any, Any, Any], pool: PoolState) -> Template:
    context = {**base_context(request, "status"), **await status_context(pool)}
    return Template("status.html", context=context)


@get(
    "/status/live",
    summary="The changing part of the status page, as an HTML fragment",
    tags=["pages"],
    response_headers=page_headers("no-cache"),
)
async def status_live(pool: PoolState) -> Template:
    return Template("_status_live.html", context=await status_context(pool))
