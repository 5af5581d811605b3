"""The open price board's public API: ``/v1/providers``, ``/v1/providers/{slug}``, ``/v1/prices``,
``/v1/history`` and ``/v1/compare``; and a provider's own profile, ``/v1/provider/profile``.

The public routes need no key: each is rate-limited per client address (a consumer key raises the
limit) and answered from :class:`~coordinator.core.viewcache.ViewCache`."""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec
from litestar import Request, Router, get, put
from litestar.params import Parameter

from coordinator.core.errors import PoolError
from coordinator.identity.providers import Profile, ProfileError
from coordinator.services import board, profiles
from coordinator.services.board import (
    INTERVALS,
    MAX_COMPARED,
    MAX_HOURLY_DAYS,
    Comparison,
    PriceHistory,
    PriceList,
    ProviderDetail,
    ProviderList,
)
from coordinator.services.state import PoolState
from coordinator.web.guards import limit_public, require_session
from shared import errors


def _model(pool: PoolState, name: str | None, param: str = "model") -> str:
    if not name:
        raise PoolError(400, errors.INVALID_REQUEST, f"`{param}` is required.", param=param)
    slug = board.known_model(pool, name)
    if slug is None:
        raise PoolError(404, errors.MODEL_NOT_FOUND, f"The model {name!r} is not known to the pool.", param=param)
    return slug


def _provider(pool: PoolState, slug: str) -> Profile:
    found = pool.providers.find(slug)
    if found is None:
        raise PoolError(404, errors.NOT_FOUND, f"No provider has the slug {slug!r}.", param="provider")
    return found


@get("/v1/providers", summary="Every provider: status, trust, uptime and what it offers", tags=["board"])
async def list_providers(pool: PoolState) -> ProviderList:
    return await pool.views.get("providers", None, lambda: board.provider_list(pool))


@get("/v1/providers/{slug:str}", summary="One provider, with its live offers", tags=["board"])
async def get_provider(pool: PoolState, slug: str) -> ProviderDetail:
    profile = _provider(pool, slug)
    detail = await pool.views.get("provider", profile.user_id, lambda: board.provider_detail(pool, profile.slug))
    if detail is None:
        raise PoolError(404, errors.NOT_FOUND, f"No provider has the slug {slug!r}.", param="slug")
    return detail


@get(
    "/v1/prices",
    summary="Every live offer: input, output and blended (3:1) price per 1M tokens",
    tags=["board"],
)
async def list_prices(
    pool: PoolState,
    model: Annotated[str | None, Parameter(required=False, description="only this model's offers")] = None,
    provider: Annotated[str | None, Parameter(required=False, description="only this provider's (slug)")] = None,
) -> PriceList:
    slug = _model(pool, model) if model is not None else None
    user_id = _provider(pool, provider).user_id if provider is not None else None
    return await pool.views.get("prices", (slug, user_id), lambda: board.price_list(pool, slug, user_id))


@get(
    "/v1/history",
    summary="OHLC candles of a model's lowest live blended price, or of one provider's",
    tags=["board"],
)
async def price_history(
    pool: PoolState,
    model: Annotated[str | None, Parameter(required=False, description="the model (required)")] = None,
    provider: Annotated[str | None, Parameter(required=False, description="one provider's price (slug)")] = None,
    days: Annotated[
        int | None, Parameter(required=False, description="how far back (default 7; 30 for 1d; 1h: at most 31)")
    ] = None,
    interval: Annotated[str, Parameter(description="candle width: 1h or 1d")] = "1h",
) -> PriceHistory:
    slug = _model(pool, model)
    if interval not in INTERVALS:
        raise PoolError(400, errors.INVALID_REQUEST, "`interval` must be `1h` or `1d`.", param="interval")
    reach = max(1, math.floor(pool.settings.price_history_days))
    if interval == "1h":
        reach = min(reach, MAX_HOURLY_DAYS)
    span = days if days is not None else min(reach, 30 if interval == "1d" else 7)
    if not 1 <= span <= reach:
        raise PoolError(
            400,
            errors.INVALID_REQUEST,
            f"`days` must be from 1 to {reach} for `{interval}` candles (the retention; hourly ones, "
            f"{MAX_HOURLY_DAYS} days at most).",
            param="days",
        )
    profile = _provider(pool, provider) if provider is not None else None
    key = (slug, profile.user_id if profile else None, span, interval)
    return await pool.views.get("history", key, lambda: board.price_history(pool, slug, profile, span, interval))


@get("/v1/compare", summary=f"Up to {MAX_COMPARED} models side by side", tags=["board"])
async def compare_models(
    pool: PoolState,
    models: Annotated[str | None, Parameter(required=False, description="model slugs, comma-separated")] = None,
) -> Comparison:
    names = list(dict.fromkeys(name.strip() for name in (models or "").split(",") if name.strip()))
    if not names:
        raise PoolError(400, errors.INVALID_REQUEST, "`models` must name 1 to 5 models, comma-separated.", "models")
    if len(names) > MAX_COMPARED:
        raise PoolError(
            400, errors.INVALID_REQUEST, f"`models` names {len(names)} models; at most {MAX_COMPARED}.", "models"
        )
    slugs = list(dict.fromkeys(_model(pool, name, "models") for name in names))  # an alias and its slug: once

    async def compute() -> Comparison:
        return board.compare(pool, slugs)

    return await pool.views.get("compare", tuple(slugs), compute)


public_router = Router(
    "/",
    route_handlers=[list_providers, get_provider, list_prices, price_history, compare_models],
    guards=[limit_public],
)


# --- a provider's own profile ------------------------------------------------------------------


class ProfileView(msgspec.Struct):
    slug: str
    name: str
    website: str | None
    description: str | None
    joined_at: str


class ProfileChange(msgspec.Struct, forbid_unknown_fields=True):
    """What to change; a field left out stays, ``website``/``description`` set to ``""`` are removed."""

    slug: str | None = None
    name: str | None = None
    website: str | None = None
    description: str | None = None


def _view(profile: Profile) -> ProfileView:
    return ProfileView(profile.slug, profile.name, profile.website, profile.description, board.iso(profile.joined_at))


@get("/v1/provider/profile", summary="Your public provider profile", tags=["portal"])
async def read_profile(request: Request[Any, Any, Any], pool: PoolState) -> ProfileView:
    return _view(profiles.profile_or_default(pool, request.state.user_id))


@put("/v1/provider/profile", summary="Change your public provider profile", tags=["portal"])
async def change_profile(request: Request[Any, Any, Any], pool: PoolState, data: ProfileChange) -> ProfileView:
    clear = frozenset(f for f in ("website", "description") if getattr(data, f) == "")
    try:
        profile = await profiles.update_profile(
            pool,
            request.state.user_id,
            slug=data.slug,
            name=data.name,
            website=data.website or None,
            description=data.description or None,
            clear=clear,
        )
    except profiles.NotAProvider as exc:
        raise PoolError(409, errors.CONFLICT, str(exc)) from None
    except ProfileError as exc:
        if exc.taken:
            raise PoolError(409, errors.CONFLICT, str(exc), exc.field) from None
        raise PoolError(400, errors.INVALID_REQUEST, str(exc), exc.field) from None
    return _view(profile)


profile_router = Router("/", route_handlers=[read_profile, change_profile], guards=[require_session])
