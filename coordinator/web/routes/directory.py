"""Public directory and pool health: ``GET /v1/models`` and ``GET /v1/pool/status``, rate-limited
per client address and answered from the pool's view cache."""

from __future__ import annotations

import re
from typing import Annotated

from litestar import get
from litestar.params import Parameter

from coordinator.core.errors import PoolError
from coordinator.services.overview import ModelList, PoolStatus, model_list, status_of
from coordinator.services.state import PoolState
from coordinator.status.history import MINUTE
from coordinator.web.guards import limit_public
from shared import errors

_SPAN = re.compile(r"(\d{1,5})([mh])")
HISTORY = Parameter(
    query="history",
    default=None,
    description="also return per-minute history over this span, e.g. `24h` or `90m` (at most the retention, 24h)",
)


def _span_seconds(value: str, retention: float) -> int:
    """Seconds in a span such as ``24h`` or ``90m``; a bad or too long span is a 400."""
    match = _SPAN.fullmatch(value)
    seconds = int(match[1]) * (3600 if match[2] == "h" else 60) if match else 0
    if not MINUTE <= seconds <= retention:
        raise PoolError(
            400,
            errors.INVALID_REQUEST,
            f"`history` must be a span such as `24h` or `90m`, from 1m to {int(retention // 3600)}h; got {value!r}.",
            param="history",
        )
    return seconds


@get("/v1/models", summary="List the models the pool serves", tags=["directory"], guards=[limit_public])
async def list_models(pool: PoolState) -> ModelList:
    async def compute() -> ModelList:
        return model_list(pool)

    return await pool.views.get("models", None, compute)


@get(
    "/v1/pool/status",
    summary="Pool health over the recent window, and per-minute history",
    tags=["directory"],
    guards=[limit_public],
)
async def pool_status(pool: PoolState, history: Annotated[str | None, HISTORY] = None) -> PoolStatus:
    span = None if history is None else _span_seconds(history, pool.history.retention)
    return await pool.views.get("status", span, lambda: status_of(pool, span))
