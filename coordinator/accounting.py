"""A request's money, start to end: hold before dispatch; settle or release and log after.

Only the hold is on the request's path. Settling, releasing and logging run in a background task
once the consumer has its answer; if the process dies first, the sweep (:meth:`Accounting.sweep`)
releases the hold, so a hold never stays pending and a consumer is never charged for a request the
pool could not account for.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator import billing
from coordinator.metering import Price
from coordinator.ratelimit import KeyLimits
from coordinator.requestlog import RequestLog, RequestRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Charge:
    """What to settle: ``amount`` for the consumer, who served it, and what the upstream costs."""

    amount: int
    provider_user_id: int | None
    upstream_cost: int = 0
    reason: str = "completed"


class Accounting:
    def __init__(
        self,
        engine: AsyncEngine,
        requests: RequestLog,
        limits: KeyLimits,
        *,
        fee_bps: int,
        hold_ttl: float,
        lease: float,
    ) -> None:
        self.engine = engine
        self.requests = requests
        self.limits = limits
        self.fee_bps = fee_bps
        self.hold_ttl = hold_ttl
        self.lease = lease
        self.instance_id = "crd_" + secrets.token_hex(8)
        self.started_at = datetime.now(UTC)
        self.live: set[str] = set()  # holds of requests still running in this process
        self._tasks: set[asyncio.Task[None]] = set()

    async def hold(self, record: RequestRecord, amount: int) -> None:
        """Reserve ``amount`` for the request; raises :class:`billing.InsufficientCredits`."""
        assert record.user_id is not None
        self.live.add(record.id)
        try:
            await billing.hold(
                self.engine, record.id, record.user_id, record.key_id, amount, self.instance_id, self.hold_ttl
            )
        except BaseException:
            self.live.discard(record.id)
            raise

    def finish(self, record: RequestRecord, charge: Charge | None, token_estimate: int = 0) -> None:
        """Resolve the request's hold (if it has one) and log it, in the background. Never blocks."""
        if record.key_id is not None and token_estimate:
            self.limits.correct(record.key_id, record.prompt_tokens + record.completion_tokens - token_estimate)
        if charge is None:
            self.requests.add(record)
            return
        task = asyncio.create_task(self._resolve(record, charge))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, record: RequestRecord, charge: Charge) -> None:
        try:
            if charge.amount > 0 or charge.upstream_cost > 0:
                settlement = await billing.settle(
                    self.engine,
                    record.id,
                    charge.amount,
                    provider_user_id=charge.provider_user_id,
                    fee_bps=self.fee_bps,
                    upstream_cost=charge.upstream_cost,
                    reason=charge.reason,
                )
                if settlement is not None:
                    record.cost = settlement.charged
                    record.provider_earned = settlement.provider_share
                    record.platform_fee = settlement.platform_fee
                    record.upstream_cost = settlement.upstream_cost
                    record.usage_capped = record.usage_capped or settlement.capped
                else:
                    log.warning("hold already resolved", extra={"hold_id": record.id})
                    record.cost = 0
            else:
                await billing.release(self.engine, record.id, charge.reason)
                record.cost = 0
        except Exception as exc:  # the sweep will release it
            log.error("could not resolve hold", extra={"hold_id": record.id, "error": str(exc)})
            record.cost = 0
        finally:
            self.live.discard(record.id)
        self.requests.add(record)

    async def sweep(self) -> int:
        """Renew this process's lease and release holds whose request is gone; returns how many."""
        await billing.renew_instance(self.engine, self.instance_id, self.started_at)
        released = 0
        for hold_id in await billing.orphaned_holds(self.engine, self.instance_id, self.live, self.lease):
            if await billing.release(self.engine, hold_id, "orphaned"):
                log.warning("released an orphaned hold", extra={"hold_id": hold_id})
                released += 1
        return released

    async def drain(self) -> None:
        """Wait for background settlements (on shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def upstream_cost(cost: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """What the platform upstream bills for the usage it reported."""
    return cost.cost(prompt_tokens, completion_tokens)
