"""Refunds for consumer jobs that a failed canary discredits.

The audit of each job catches what one job shows (inflated usage, impossible speed, garbage, stalls),
and those jobs are billed as counted or not at all. A different model behind the claimed one shows
only when a canary's answer differs from the reference, which needs trusted agents of two providers:
until then the agent may have served consumers. So each process keeps the consumer jobs an agent
token served for a model since its last canary for that model passed; a passed canary vouches for
them (they leave), a failed one refunds each: the consumer gets the charge back, the provider's share
comes out of its earnings (the platform covers what those no longer hold) and the fee out of the
platform's. Refunds are written in the background, after the charges they undo, and once per request.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator import billing
from coordinator.accounting import Accounting
from coordinator.requestlog import RequestRecord

log = logging.getLogger(__name__)

KEPT = 10_000  # jobs kept per agent token and model; older ones leave unvouched (and unrefundable)


@dataclass(frozen=True, slots=True)
class Served:
    """A consumer job that cost something: what to give back, and to whom."""

    request_id: str
    user_id: int
    provider_user_id: int
    cost: int
    share: int


@dataclass
class Clawback:
    engine: AsyncEngine
    accounting: Accounting
    unvouched: dict[tuple[int, str], deque[Served]] = field(default_factory=dict)  # (token, model) → jobs
    due: list[Served] = field(default_factory=list)

    def served(self, token_id: int, slug: str, record: RequestRecord) -> None:
        """Keep a finished consumer job that an agent served (and the consumer paid for)."""
        if record.cost <= 0 or record.user_id is None or record.provider_user_id is None:
            return
        jobs = self.unvouched.setdefault((token_id, slug), deque(maxlen=KEPT))
        jobs.append(Served(record.id, record.user_id, record.provider_user_id, record.cost, record.provider_earned))

    def vouched(self, token_id: int, slug: str) -> None:
        """A canary for ``slug`` passed: the token's jobs for it so far stand."""
        self.unvouched.pop((token_id, slug), None)

    def discredited(self, token_id: int, slug: str) -> None:
        """A canary for ``slug`` failed: refund the token's jobs for it since the last one passed."""
        jobs = self.unvouched.pop((token_id, slug), None)
        if jobs:
            self.due.extend(jobs)
            log.warning("refunding discredited jobs", extra={"token_id": token_id, "model": slug, "jobs": len(jobs)})

    async def refund_due(self) -> int:
        """Write the refunds that are due; returns how many were written. What fails stays due."""
        if not self.due:
            return 0
        due, self.due = self.due, []
        written, failed = 0, []
        flushed: set[int] = set()
        for job in due:
            try:
                if job.user_id not in flushed:  # the charge goes to the ledger before its refund
                    await self.accounting.flush(user_id=job.user_id)
                    flushed.add(job.user_id)
                if job.request_id in self.accounting.dropped:
                    continue  # its charge never reached the ledger: nothing to give back
                written += await billing.refund(
                    self.engine, job.request_id, job.user_id, job.provider_user_id, job.cost, job.share
                )
            except Exception as exc:  # the database is away: try again on the next sweep
                log.error("refund failed, will retry", extra={"request_id": job.request_id, "error": str(exc)})
                failed.append(job)
        self.due = failed + self.due
        return written
