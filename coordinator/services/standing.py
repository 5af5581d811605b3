"""A provider's standing: each agent token's trust score, the evidence behind it, and its connected
agents. The provider API and the portal page both read it."""

from __future__ import annotations

import time
from typing import Any, cast

import msgspec
from sqlalchemy import Table, select

from coordinator.core.models import AgentToken, TrustEvidenceRow
from coordinator.services.state import PoolState
from coordinator.trust import scores as trust
from shared.money import nano_per_token_to_usd_per_million

RECENT_EVIDENCE = 20


_tokens = cast(Table, AgentToken.__table__)


_evidence = cast(Table, TrustEvidenceRow.__table__)


class EvidenceItem(msgspec.Struct):
    kind: str
    weight: float
    count: int
    detail: str
    jobId: str | None
    at: str


class OfferView(msgspec.Struct):
    model: str
    backendModel: str
    quantization: str
    pricePromptPer1mUsd: float
    priceCompletionPer1mUsd: float


class ConnectedView(msgspec.Struct):
    agentId: str
    models: list[OfferView]
    maxConcurrency: int
    concurrencyCap: int | None
    inFlight: int
    draining: bool


class AgentStanding(msgspec.Struct):
    tokenId: int
    name: str
    prefix: str
    trustScore: float
    routable: bool  # at or above the pool's threshold: gets consumer traffic
    evidence: list[EvidenceItem]
    connected: list[ConnectedView]


class ProviderAgents(msgspec.Struct):
    trustScore: float | None  # the provider's: mean of its tokens' scores
    trustThreshold: float
    agents: list[AgentStanding]


async def provider_standing(pool: PoolState, user_id: int) -> ProviderAgents:
    """The provider's agent tokens with their scores, recent evidence and connected agents."""
    await pool.trust.flush()
    now = time.time()
    since = trust.evidence_horizon(now, pool.trust.half_life)
    async with pool.engine.connect() as conn:
        tokens = (
            await conn.execute(
                select(_tokens)
                .where(_tokens.c.user_id == user_id, _tokens.c.revoked_at.is_(None))
                .order_by(_tokens.c.id)
            )
        ).all()
        rows = (
            await conn.execute(
                select(_evidence)
                .where(_evidence.c.provider_user_id == user_id, _evidence.c.created_at >= since)
                .order_by(_evidence.c.created_at, _evidence.c.id)
            )
        ).all()
    standings = []
    for token in tokens:
        mine = [row for row in rows if row.agent_token_id == token.id]
        score = trust.reputation_of(
            (trust.evidence_of(row) for row in mine if row.kind in trust.WEIGHTS), pool.trust.half_life, now
        ).score()
        standings.append(
            AgentStanding(
                tokenId=token.id,
                name=token.name,
                prefix=token.prefix,
                trustScore=round(score, 1),
                routable=score >= pool.settings.trust_threshold,
                evidence=[_item(row) for row in reversed(mine[-RECENT_EVIDENCE:])],
                connected=[_connected(agent) for agent in pool.registry.agents() if agent.token_id == token.id],
            )
        )
    scores = [standing.trustScore for standing in standings]
    return ProviderAgents(
        trustScore=round(sum(scores) / len(scores), 1) if scores else None,
        trustThreshold=pool.settings.trust_threshold,
        agents=standings,
    )


def _item(row: Any) -> EvidenceItem:
    return EvidenceItem(row.kind, row.weight, row.count, row.detail, row.job_id, row.created_at.isoformat())


def _connected(agent: Any) -> ConnectedView:
    return ConnectedView(
        agentId=agent.agent_id,
        models=[
            OfferView(
                slug,
                offer.backend_model,
                offer.quantization,
                nano_per_token_to_usd_per_million(offer.price_in),
                nano_per_token_to_usd_per_million(offer.price_out),
            )
            for slug, offer in agent.models.items()
        ],
        maxConcurrency=agent.max_concurrency,
        concurrencyCap=agent.concurrency_cap,
        inFlight=agent.in_flight,
        draining=agent.draining,
    )
