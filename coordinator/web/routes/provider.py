"""``GET /v1/provider/agents``: a provider's agent tokens, their trust scores with the evidence behind
them, and the agents connected with them (to this coordinator process)."""

from __future__ import annotations

from typing import Any

from litestar import Request, get

from coordinator.services.standing import ProviderAgents, provider_standing
from coordinator.services.state import PoolState
from coordinator.web.guards import require_account


@get(
    "/v1/provider/agents",
    guards=[require_account],
    summary="Your agent tokens: trust score, the evidence behind it, and connected agents",
    tags=["account"],
)
async def provider_agents(request: Request[Any, Any, Any], pool: PoolState) -> ProviderAgents:
    return await provider_standing(pool, request.state.user_id)
