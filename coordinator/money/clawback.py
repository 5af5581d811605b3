"""Refunds for consumer jobs that failed canaries discredit.

The audit of each job catches what one job shows (inflated usage, impossible speed, garbage, stalls),
and those jobs are billed as counted or not at all. A different model behind the claimed one shows
only when a canary's answer differs from a trusted source's reference (``coordinator/trust/references.py``):
until then the agent may have served consumers. So each process keeps the consumer jobs an agent
token's agents served for a model since a canary vouched for them. A passed canary vouches for the
jobs of the agent that answered it which ended before its answer (they leave). A failed one is a
strike; ``confirmations`` strikes on distinct prompts without a pass between confirm the disagreement
(one odd answer, a reference gone stale, never costs an honest provider its earnings) and refund
every job kept for the token and model (reconnecting does not shed them), and the jobs that end after
it, until a canary passes again: the consumer gets the charge back, the
provider's share comes out of its escrowed, then matured earnings (the platform covers what those
no longer hold) and the fee out of the platform's. Refunds are written in the background, after the
charges they undo, and once per request, and reach back only as far as earnings stay in escrow
(``reach``: POOL_PAYOUT_HOLD_DAYS).

Restarts forget what is in memory, so the database keeps what a refund needs after one: the
request log names the agent token behind each job, and ``canary_vouches`` the last passed canary
per token and model. A confirmed failure also refunds the logged jobs of that token and model since
then (since the vouch: per token, where memory knows the very agent; a job that started before the
vouch and ended after it stands).

With replicas, every replica keeps the jobs it served, whichever replica holds the agent; the
replica that runs a canary tells every replica its verdict (:class:`SharedVerdicts`, a push), so a
failed canary refunds the jobs of the whole pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol, cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core.cluster import Cluster, Disagreed, Push, Vouched
from coordinator.core.models import CanaryVouch, RequestLogRow
from coordinator.money import ledger
from coordinator.money.leases import CreditLeases
from coordinator.money.requestlog import RequestRecord

log = logging.getLogger(__name__)
_log_rows = cast(Table, RequestLogRow.__table__)
_vouches = cast(Table, CanaryVouch.__table__)

KEPT = 10_000  # jobs kept per agent token and model; older ones leave unvouched (and unrefundable)
TOKENS = 10_000  # (token, model) pairs kept; the least recently served leave first

Key = tuple[int, str]  # (agent token id, model slug)


class Served(NamedTuple):
    """A consumer job that cost something: what to give back, and to whom. A tuple of plain values,
    which the garbage collector stops tracking: tens of thousands wait here for a canary."""

    request_id: str
    agent_id: str
    user_id: int
    provider_user_id: int
    cost: int
    share: int
    at: float  # time.monotonic() when it ended


class Verdicts(Protocol):
    """Where canary verdicts go: a :class:`Clawback`, or every replica's (:class:`SharedVerdicts`)."""

    def vouched(self, token_id: int, agent_id: str, slug: str, answered_at: float) -> None: ...

    def disagreed(self, token_id: int, slug: str, prompt: str) -> bool: ...


@dataclass
class Clawback:
    engine: AsyncEngine
    leases: CreditLeases
    unvouched: OrderedDict[Key, deque[Served]] = field(default_factory=OrderedDict)
    confirmations: int = 2  # failed canaries, on distinct prompts, that confirm a disagreement
    discredited_now: set[Key] = field(default_factory=set)  # confirmed failing: refund jobs as they end
    strikes: OrderedDict[Key, set[str]] = field(default_factory=OrderedDict)  # prompts failed since a pass
    due: list[Served] = field(default_factory=list)
    reach: float = 7 * 86_400.0  # seconds: jobs older than this are not refunded (their earnings matured)
    vouches: dict[Key, datetime] = field(default_factory=dict)  # passed canaries to write
    stored: set[Key] = field(default_factory=set)  # discredited: refund their logged jobs too
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def served(self, token_id: int, agent_id: str, slug: str, record: RequestRecord) -> None:
        """Keep a finished consumer job that an agent served (and the consumer paid for)."""
        if record.cost <= 0 or record.user_id is None or record.provider_user_id is None:
            return
        paid = (record.user_id, record.provider_user_id, record.cost, record.provider_earned)
        job = Served(record.id, agent_id, *paid, time.monotonic())
        key = (token_id, slug)
        if key in self.discredited_now:
            self.due.append(job)
            return
        jobs = self.unvouched.get(key)
        if jobs is None:
            jobs = self.unvouched[key] = deque(maxlen=KEPT)
            while len(self.unvouched) > TOKENS:
                self.unvouched.popitem(last=False)
        self.unvouched.move_to_end(key)
        jobs.append(job)

    def vouched(self, token_id: int, agent_id: str, slug: str, answered_at: float) -> None:
        """A canary for ``slug`` passed, answered by ``agent_id`` at ``answered_at``: that agent's
        jobs that ended before then stand."""
        key = (token_id, slug)
        self.discredited_now.discard(key)
        self.strikes.pop(key, None)
        self.stored.discard(key)
        self.vouches[key] = datetime.now(UTC) - timedelta(seconds=max(0.0, time.monotonic() - answered_at))
        jobs = self.unvouched.get(key)
        if jobs:
            kept = [job for job in jobs if job.agent_id != agent_id or job.at > answered_at]
            self.unvouched[key] = deque(kept, maxlen=KEPT)

    def disagreed(self, token_id: int, slug: str, prompt: str) -> bool:
        """A canary for ``slug`` failed on ``prompt`` (its digest): a strike; refund the token's jobs
        once the strikes confirm the disagreement. Whether they do."""
        key = (token_id, slug)
        prompts = self.strikes.pop(key, set())
        prompts.add(prompt)
        self.strikes[key] = prompts
        while len(self.strikes) > TOKENS:
            self.strikes.popitem(last=False)
        if len(prompts) < self.confirmations:
            return False
        self.discredited(token_id, slug)
        return True

    def discredited(self, token_id: int, slug: str) -> None:
        """Canaries for ``slug`` confirmed failing: refund the token's jobs for it that no canary
        vouched for, and those still running, as they end."""
        key = (token_id, slug)
        if len(self.discredited_now) < TOKENS:
            self.discredited_now.add(key)
            self.stored.add(key)
        jobs = self.unvouched.pop(key, None)
        if jobs:
            self.due.extend(jobs)
            log.warning("refunding discredited jobs", extra={"token_id": token_id, "model": slug, "jobs": len(jobs)})

    async def refund_due(self) -> int:
        """Write the refunds that are due; returns how many were written. What fails stays due.
        One call at a time, so a shutdown waits for the sweep that is running."""
        async with self._writing:
            return await self._refund()

    async def _remember(self) -> None:
        """Write the passed canaries, and queue the logged jobs of the tokens discredited since the
        last sweep (jobs this process still had in memory are among them; each refunds once)."""
        vouches, self.vouches = self.vouches, {}
        stored, self.stored = self.stored, set()
        try:
            for (token_id, slug), at in vouches.items():
                await _vouch(self.engine, token_id, slug, at)
            if stored:
                await self.leases.requests.flush()
            for token_id, slug in list(stored):
                queued = {job.request_id for job in self.due}
                self.due += [job for job in await self._logged(token_id, slug) if job.request_id not in queued]
                stored.discard((token_id, slug))
        except Exception as exc:  # the database is away: the next sweep tries again
            self.vouches = {**vouches, **self.vouches}
            self.stored |= stored
            log.error("clawback could not reach the database", extra={"error": str(exc)})

    async def _logged(self, token_id: int, slug: str) -> list[Served]:
        """The token's logged, paid, unrefunded jobs for ``slug`` since its last passed canary and
        within the reach."""
        since = datetime.now(UTC) - timedelta(seconds=self.reach)
        async with self.engine.connect() as conn:
            vouched = await conn.scalar(
                select(_vouches.c.vouched_at).where(_vouches.c.agent_token_id == token_id, _vouches.c.model == slug)
            )
            if vouched is not None:
                since = max(since, vouched if vouched.tzinfo else vouched.replace(tzinfo=UTC))
            rows = (
                await conn.execute(
                    select(
                        _log_rows.c.id,
                        _log_rows.c.agent_id,
                        _log_rows.c.user_id,
                        _log_rows.c.provider_user_id,
                        _log_rows.c.cost,
                        _log_rows.c.provider_earned,
                    )
                    .where(
                        _log_rows.c.agent_token_id == token_id,
                        _log_rows.c.model == slug,
                        _log_rows.c.created_at > since,
                        _log_rows.c.cost > 0,
                        _log_rows.c.refunded.is_(False),
                        _log_rows.c.user_id.is_not(None),
                        _log_rows.c.provider_user_id.is_not(None),
                    )
                    .order_by(_log_rows.c.created_at.desc())
                    .limit(KEPT)
                )
            ).all()
        now = time.monotonic()
        if rows:
            log.warning(
                "refunding logged discredited jobs", extra={"token_id": token_id, "model": slug, "jobs": len(rows)}
            )
        return [Served(r[0], r[1] or "", int(r[2]), int(r[3]), int(r[4]), int(r[5]), now) for r in rows]

    async def _refund(self) -> int:
        await self._remember()
        if not self.due:
            return 0
        due, self.due = self.due, []
        written, failed = 0, []
        flushed: set[int] = set()
        oldest = time.monotonic() - self.reach
        for job in due:
            if job.at < oldest:  # its earnings have left escrow: it stands
                continue
            try:
                if not flushed:  # the request log rows, to be marked refunded
                    await self.leases.requests.flush()
                if job.user_id not in flushed:  # the charge goes to the ledger before its refund
                    await self.leases.flush(user_id=job.user_id)
                    flushed.add(job.user_id)
                if job.request_id in self.leases.dropped:
                    self.leases.dropped.discard(job.request_id)
                    continue  # its charge never reached the ledger: nothing to give back
                written += await ledger.refund(
                    self.engine, job.request_id, job.user_id, job.provider_user_id, job.cost, job.share
                )
                pending = self.leases.requests.unflushed(job.request_id)
                if pending is not None:  # its log row was not written yet: it will say refunded
                    pending.refunded = True
            except Exception as exc:  # the database is away: try again on the next sweep
                log.error("refund failed, will retry", extra={"request_id": job.request_id, "error": str(exc)})
                failed.append(job)
        self.due = failed + self.due
        return written


async def _vouch(engine: AsyncEngine, token_id: int, slug: str, at: datetime) -> None:
    """Keep the latest passed canary of a token and model."""
    async with engine.begin() as conn:
        moved = await conn.execute(
            update(_vouches)
            .where(_vouches.c.agent_token_id == token_id, _vouches.c.model == slug, _vouches.c.vouched_at < at)
            .values(vouched_at=at)
        )
        if moved.rowcount:
            return
        try:
            async with conn.begin_nested():
                await conn.execute(insert(_vouches), [{"agent_token_id": token_id, "model": slug, "vouched_at": at}])
        except IntegrityError:  # there is one already, as late or later
            pass


@dataclass
class SharedVerdicts:
    """Canary verdicts told to every replica's clawback through Redis (each applies them with
    :func:`apply_verdict`), this replica's included."""

    cluster: Cluster

    def vouched(self, token_id: int, agent_id: str, slug: str, answered_at: float) -> None:
        self.cluster.tell(Vouched(token_id, agent_id, slug, max(0.0, time.monotonic() - answered_at)))

    def disagreed(self, token_id: int, slug: str, prompt: str) -> bool:
        self.cluster.tell(Disagreed(token_id, slug, prompt))
        return False  # each replica's clawback decides when the strikes confirm it


def apply_verdict(clawback: Clawback, push: Push) -> None:
    """A verdict another replica (or this one) told every replica."""
    if isinstance(push, Vouched):
        clawback.vouched(push.token_id, push.agent_id, push.slug, time.monotonic() - push.ago)
    elif isinstance(push, Disagreed):
        clawback.disagreed(push.token_id, push.slug, push.prompt)
