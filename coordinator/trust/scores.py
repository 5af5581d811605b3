"""Trust scores, 0-100 per agent (its agent token) and per provider, from stored evidence with decay.

Every piece of evidence has a kind, a signed weight and a time. A score is a beta reputation:
``100 * good / (good + bad)``, where ``good`` and ``bad`` are a prior plus the weights in favour and
against, each halved every ``half_life`` seconds. New agents start at the prior's score (50): enough
for consumer traffic at limited concurrency, and close enough to the threshold that one clear sign
of cheating puts them below it; below it they get only verification jobs until those, and time,
lift them again. Evidence is written to ``trust_evidence`` in batches, so every score can be
explained from its rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core.models import TrustEvidenceRow
from coordinator.market.registry import ConnectedAgent
from shared import errors
from shared.backend import Failure

log = logging.getLogger(__name__)
_table = cast(Table, TrustEvidenceRow.__table__)

# Evidence kinds and their weights (positive: in the agent's favour).
COMPLETED = "completed"  # a job served to its end, output sane, usage honest, speed plausible
CANARY_PASSED = "canary_passed"
FAILED = "failed"  # failed before any output
ABORTED = "aborted"  # failed or vanished after output began
STALLED = "stalled"  # went silent after output began
HEARTBEAT_MISSED = "heartbeat_missed"
USAGE_INFLATED = "usage_inflated"  # reported more tokens than it delivered
IMPLAUSIBLE_SPEED = "implausible_speed"  # faster than the model can run
BAD_OUTPUT = "bad_output"  # empty output marked stop, one token repeated, invalid UTF-8
CANARY_FAILED = "canary_failed"  # answered a reference prompt unlike the model it claims
OVERRAN = "output_overrun"  # sent more output than the request allowed
# Failures that break a job the consumer then does not pay for.
UNPAID_FAILURES = frozenset({errors.TIMED_OUT, errors.OUTPUT_OVERRUN})


def is_rejection(failure: Failure) -> bool:
    """A backend refusing the request itself (400/413/422): the consumer's doing, unless another
    provider serves the same request."""
    return failure.code == errors.BACKEND_REJECTED and failure.status in (400, 413, 422)


# Failures that say nothing of the agent: it was full or draining, the consumer stopped reading, or
# the replicas between the consumer and the agent lost touch (the job relay).
NOT_THE_AGENTS = frozenset({errors.AGENT_BUSY, errors.AGENT_DRAINING, errors.CONSUMER_TOO_SLOW, errors.RELAY_LOST})


def failure_evidence(failure: Failure, *, started: bool) -> str | None:
    """The evidence kind a failed job is against its agent (``started``: after output began), or
    ``None`` when the agent was not at fault: a full or draining agent, a consumer too slow to
    read, a relay between replicas that lost touch, or a backend refusing the request (judged
    against a second opinion by the dispatcher). Output beyond the request's bound is an overrun;
    a silence after output began is a stall, any other failure then an abort."""
    if failure.code in NOT_THE_AGENTS or is_rejection(failure):
        return None
    if failure.code == errors.OUTPUT_OVERRUN:
        return OVERRAN
    if started:
        return STALLED if failure.code == errors.TIMED_OUT else ABORTED
    return FAILED


WEIGHTS = {
    COMPLETED: 1.0,
    CANARY_PASSED: 3.0,
    FAILED: -1.0,
    ABORTED: -2.0,
    STALLED: -6.0,
    HEARTBEAT_MISSED: -2.0,
    USAGE_INFLATED: -8.0,
    IMPLAUSIBLE_SPEED: -10.0,
    BAD_OUTPUT: -6.0,
    CANARY_FAILED: -10.0,
    OVERRAN: -6.0,
}

PRIOR_GOOD = 3.0
PRIOR_BAD = 3.0
TRUSTED = 70.0  # from here on an agent's own concurrency applies
COMPLETED_ROW_SECONDS = 60.0  # a busy agent's completed jobs are written as one row a minute
MEMORY_HALF_LIVES = 10  # evidence older than this many half-lives weighs < 0.1 %: not loaded


@dataclass
class Reputation:
    """Decayed sums of the evidence for and against one agent token, as of ``at``."""

    good: float = 0.0
    bad: float = 0.0
    at: float = 0.0

    def add(self, weight: float, at: float, half_life: float, count: int = 1) -> None:
        self.decay_to(at, half_life)
        if weight >= 0:
            self.good += weight * count
        else:
            self.bad -= weight * count

    def decay_to(self, at: float, half_life: float) -> None:
        if at > self.at:
            factor = math.pow(0.5, (at - self.at) / half_life) if self.at else 1.0
            self.good *= factor
            self.bad *= factor
            self.at = at

    def score(self) -> float:
        good = PRIOR_GOOD + self.good
        return 100.0 * good / (good + PRIOR_BAD + self.bad)


def concurrency_cap(score: float, new_agent_concurrency: int) -> int | None:
    """How many consumer jobs an agent with ``score`` may run at once (``None``: its own limit)."""
    return None if score >= TRUSTED else new_agent_concurrency


@dataclass(frozen=True, slots=True)
class Evidence:
    token_id: int
    provider_user_id: int
    kind: str
    at: float
    count: int = 1
    detail: str = ""
    job_id: str | None = None

    @property
    def weight(self) -> float:
        return WEIGHTS[self.kind]


def reputation_of(evidence: Iterable[Evidence], half_life: float, now: float) -> Reputation:
    """The reputation the evidence adds up to at ``now``."""
    reputation = Reputation()
    for item in sorted(evidence, key=lambda e: e.at):
        reputation.add(item.weight, item.at, half_life, item.count)
    reputation.decay_to(now, half_life)
    return reputation


def evidence_horizon(now: float, half_life: float) -> datetime:
    """Evidence older than this weighs next to nothing: it is not read."""
    return datetime.fromtimestamp(now - MEMORY_HALF_LIVES * half_life, UTC)


def evidence_of(row: Any) -> Evidence:
    """Evidence from a ``trust_evidence`` row (its weight is the kind's, as of now)."""
    return Evidence(row.agent_token_id, row.provider_user_id, row.kind, row.created_at.timestamp(), row.count)


@dataclass
class TrustBook:
    """The reputations of the agent tokens connected to this process, and of their providers, and
    evidence to write.

    An agent's standing is the lower of its token's score and its provider's (all the provider's
    tokens' evidence together): one identity per token for what it did, and a provider caught
    cheating cannot start afresh by minting a new token. An agent token connects to one process at
    a time in normal use; a second process loads the stored evidence when it connects, so scores
    follow agents across restarts and processes."""

    engine: AsyncEngine
    half_life: float
    new_agent_concurrency: int
    reputations: dict[int, Reputation] = field(default_factory=dict)
    providers: dict[int, Reputation] = field(default_factory=dict)  # provider user id -> all its tokens' evidence
    pending: list[Evidence] = field(default_factory=list)
    _owners: dict[int, int] = field(default_factory=dict)  # loaded token -> its provider
    # With replicas: evidence about another replica's agent goes there (it holds the standing).
    forward: Callable[[ConnectedAgent, str, str, str | None], None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def load(self, token_id: int, provider_user_id: int | None = None) -> Reputation:
        """The token's reputation from its stored evidence and what waits to be written (cached
        while it is connected); with ``provider_user_id``, its provider's is loaded too."""
        known = self.reputations.get(token_id)
        if known is not None and (provider_user_id is None or provider_user_id in self.providers):
            return known
        now = time.time()
        since = evidence_horizon(now, self.half_life)
        by_token = select(_table).where(_table.c.agent_token_id == token_id, _table.c.created_at >= since)
        async with self._lock:  # no flush moves evidence from pending to the table meanwhile
            async with self.engine.connect() as conn:
                rows = (await conn.execute(by_token)).all()
                if provider_user_id is not None and provider_user_id not in self.providers:
                    by_provider = select(_table).where(
                        _table.c.provider_user_id == provider_user_id, _table.c.created_at >= since
                    )
                    provided = [evidence_of(r) for r in (await conn.execute(by_provider)).all() if r.kind in WEIGHTS]
                    provided += [e for e in self.pending if e.provider_user_id == provider_user_id]
                    self.providers[provider_user_id] = reputation_of(provided, self.half_life, now)
            evidence = [evidence_of(row) for row in rows if row.kind in WEIGHTS]
            evidence += [item for item in self.pending if item.token_id == token_id]
        if provider_user_id is not None:
            self._owners[token_id] = provider_user_id
        return self.reputations.setdefault(token_id, reputation_of(evidence, self.half_life, now))

    async def load_standing(self, token_id: int, provider_user_id: int) -> float:
        """Load a connecting agent's token and provider; its standing."""
        await self.load(token_id, provider_user_id)
        return self.standing(token_id, provider_user_id)

    def forget(self, token_id: int) -> None:
        self.reputations.pop(token_id, None)
        provider = self._owners.pop(token_id, None)
        if provider is not None and provider not in self._owners.values():
            self.providers.pop(provider, None)

    def record(self, evidence: Evidence) -> float:
        """Count one piece of evidence now; returns the token's new standing. Evidence about a
        token not loaded here (its agent went away) is only written: the next load reads it."""
        self.pending.append(evidence)
        provider = self.providers.get(evidence.provider_user_id)
        if provider is not None:
            provider.add(evidence.weight, evidence.at, self.half_life, evidence.count)
        reputation = self.reputations.get(evidence.token_id)
        if reputation is None:
            return Reputation().score()
        reputation.add(evidence.weight, evidence.at, self.half_life, evidence.count)
        return min(reputation.score(), provider.score() if provider is not None else 100.0)

    def witness(self, agent: ConnectedAgent, kind: str, detail: str = "", job_id: str | None = None) -> None:
        """Count evidence about ``agent`` now and apply its new standing to it (another replica's
        agent: that replica does, told through ``forward``)."""
        if agent.replica is not None and self.forward is not None:
            self.forward(agent, kind, detail, job_id)
            return
        score = self.record(Evidence(agent.token_id, agent.user_id, kind, time.time(), detail=detail, job_id=job_id))
        if agent.token_id not in self.reputations:
            return
        if kind != COMPLETED:
            log.info(
                "trust evidence",
                extra={"agent_id": agent.agent_id, "kind": kind, "detail": detail, "score": round(score, 1)},
            )
        self.apply(agent, score)

    def witness_failure(
        self, agent: ConnectedAgent, failure: Failure, *, started: bool, job_id: str, origin: str = ""
    ) -> bool:
        """Evidence from a job of ``agent``'s that failed (``started``: after output began), as
        :func:`failure_evidence` judges it; whether the agent was at fault."""
        kind = failure_evidence(failure, started=started)
        if kind is None:
            return False
        self.witness(agent, kind, f"{origin}{failure.code}: {failure.message}", job_id)
        return True

    def witness_refusal(self, agent: ConnectedAgent, failure: Failure, job_id: str) -> None:
        """``agent`` refused as a bad request what another provider then served: its failure."""
        self.witness(agent, FAILED, f"refused a request another provider served: {failure.message}", job_id)

    def apply(self, agent: ConnectedAgent, score: float) -> None:
        agent.trust = score
        agent.concurrency_cap = concurrency_cap(score, self.new_agent_concurrency)

    def score(self, token_id: int, now: float | None = None) -> float:
        reputation = self.reputations.get(token_id)
        if reputation is None:
            return Reputation().score()
        reputation.decay_to(now or time.time(), self.half_life)
        return reputation.score()

    def standing(self, token_id: int, provider_user_id: int, now: float | None = None) -> float:
        """The lower of the token's score and its provider's."""
        at = now or time.time()
        provider = self.providers.get(provider_user_id)
        if provider is None:
            return self.score(token_id, at)
        provider.decay_to(at, self.half_life)
        return min(self.score(token_id, at), provider.score())

    async def flush(self, everything: bool = True) -> int:
        """Write pending evidence; on failure it waits for the next flush. ``completed`` jobs are
        merged into one row per token and, unless ``everything``, held until the oldest is a minute
        old, so a busy agent adds a row a minute rather than one per flush."""
        async with self._lock:
            batch, self.pending = self.pending, []
            if not everything:
                horizon = time.time() - COMPLETED_ROW_SECONDS
                held = {e.token_id for e in batch if e.kind == COMPLETED and e.at > horizon}
                held -= {e.token_id for e in batch if e.kind == COMPLETED and e.at <= horizon}
                self.pending = [e for e in batch if e.kind == COMPLETED and e.token_id in held]
                batch = [e for e in batch if not (e.kind == COMPLETED and e.token_id in held)]
            if not batch:
                return 0
            rows = _rows(batch)
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(insert(_table), rows)
            except Exception as exc:
                log.error("trust evidence flush failed", extra={"error": str(exc), "rows": len(rows)})
                self.pending = batch + self.pending
                return 0
            return len(rows)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()


def _rows(batch: list[Evidence]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    merged: dict[int, dict[str, object]] = {}
    for item in batch:
        if item.kind == COMPLETED:
            row = merged.get(item.token_id)
            if row is not None:
                row["count"] = cast(int, row["count"]) + item.count
                continue
        row = {
            "agent_token_id": item.token_id,
            "provider_user_id": item.provider_user_id,
            "kind": item.kind,
            "weight": item.weight,
            "count": item.count,
            "detail": item.detail[:200],
            "job_id": item.job_id,
            "created_at": datetime.fromtimestamp(item.at, UTC),
        }
        rows.append(row)
        if item.kind == COMPLETED:
            merged[item.token_id] = row
    return rows
