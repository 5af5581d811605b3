"""Spend caps per key and period (a UTC day, a UTC month), across every coordinator process, without
a database write on the request's path: the credit-lease design (``leases.py``) for budgets.

The ``key_budgets`` table counts, per key and period, the nano-USD handed out to processes
(``leased``). A process takes a chunk of a key's budget with one conditional update that never lets
``leased`` pass the cap; a request's worst case is then carved out of that chunk in memory, and its
real cost replaces the worst case when it ends. What a process has not used goes back to the table
when it sits idle and when the process stops. So no process, and no number of them, spends past a
cap; a process that dies strands its unused chunk until the period ends (the cap then reads lower,
never higher).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core.models import KeyBudgetRow

_table = cast(Table, KeyBudgetRow.__table__)
DAY, MONTH = "day", "month"
CHUNKS = 20  # a chunk is a twentieth of the cap (or the request's worst case, if more)
IDLE_SECONDS = 10.0  # an allowance unused this long goes back to the table (others may need it)


class CapReached(Exception):
    """The key's spend cap for ``period`` leaves no room for this request's worst case."""

    def __init__(self, period: str, cap: int) -> None:
        super().__init__(period)
        self.period, self.cap = period, cap


def period_of(kind: str, now: datetime) -> str:
    return now.strftime("%Y-%m-%d") if kind == DAY else now.strftime("%Y-%m")


@dataclass(eq=False)
class Allowance:
    """The part of one key's budget for one period that this process holds."""

    key_id: int
    period: str
    cap: int
    leased: int = 0  # taken from the table by this process
    used: int = 0  # spent and held by this process's requests
    pool_leased: int = 0  # the table's count after this process's last take (every process's)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def room(self) -> int:
        return self.leased - self.used

    def remaining(self) -> int:
        """What the key may still spend this period, as far as this process knows."""
        return max(0, self.cap - self.pool_leased + self.room)


@dataclass(eq=False)
class BudgetHold:
    """A request's worst case, carved out of each capped period's allowance."""

    allowances: list[Allowance]
    amount: int


class KeyBudgets:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.engine = engine
        self.clock = clock
        self._allowances: dict[tuple[int, str], Allowance] = {}
        self._lock = asyncio.Lock()

    async def reserve(self, key_id: int, caps: dict[str, int], amount: int) -> BudgetHold:
        """Carve ``amount`` out of the key's allowance for each capped period (``caps``: kind → cap
        in nano-USD); :class:`CapReached` naming the first period without room."""
        now = self.clock()
        taken: list[Allowance] = []
        try:
            for kind, cap in caps.items():
                allowance = await self._room_for(key_id, kind, period_of(kind, now), cap, amount)
                allowance.used += amount
                allowance.last_used = time.monotonic()
                taken.append(allowance)
        except BaseException:  # refused, the database away, or the consumer gone: nothing stays held
            for allowance in taken:
                allowance.used -= amount
            raise
        return BudgetHold(taken, amount)

    async def _room_for(self, key_id: int, kind: str, period: str, cap: int, amount: int) -> Allowance:
        allowance = self._allowances.get((key_id, period))
        if allowance is None:
            allowance = self._allowances[(key_id, period)] = Allowance(key_id, period, cap)
        if allowance.cap != cap:  # the policy changed: the same allowance, its unused part given back
            async with self._lock:
                if allowance.cap != cap:
                    allowance.cap = cap
                    await self._give_back_locked(allowance)
        if allowance.room >= amount:
            return allowance
        async with self._lock:
            while allowance.room < amount and await self._take(allowance, amount - allowance.room):
                pass
        if allowance.room < amount:
            raise CapReached(kind, cap)
        return allowance

    async def _take(self, allowance: Allowance, need: int) -> bool:
        """Lease at least ``need`` more of the key's budget (a chunk if the cap leaves room); whether
        it could. This process's count moves only once the table's has been committed."""
        chunk = max(need, allowance.cap // CHUNKS)
        where = (_table.c.key_id == allowance.key_id) & (_table.c.period == allowance.period)
        async with self.engine.begin() as conn:
            leased = (await conn.execute(select(_table.c.leased).where(where))).scalar()
        if leased is None:
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        insert(_table).values(key_id=allowance.key_id, period=allowance.period, leased=0)
                    )
            except IntegrityError:  # another process made the row first
                pass
            leased = 0
        granted = 0
        async with self.engine.begin() as conn:
            for _ in range(20):  # the count moved under us: read it again, take what is left
                grant = min(chunk, allowance.cap - leased)
                if grant < need:
                    break
                done = await conn.execute(
                    update(_table).where(where, _table.c.leased == leased).values(leased=leased + grant)
                )
                if done.rowcount:
                    granted, leased = grant, leased + grant
                    break
                leased = (await conn.execute(select(_table.c.leased).where(where))).scalar() or 0
        allowance.leased += granted  # committed
        allowance.pool_leased = leased
        return granted > 0

    def finish(self, hold: BudgetHold | None, cost: int) -> None:
        """The request cost ``cost``: that stays spent, the rest of its worst case is free again."""
        if hold is None:
            return
        for allowance in hold.allowances:
            allowance.used -= hold.amount - min(cost, hold.amount)

    def remaining(self, key_id: int, caps: dict[str, int]) -> dict[str, int]:
        """What the key may still spend per capped period, as this process knows it."""
        now = self.clock()
        known = {}
        for kind, cap in caps.items():
            allowance = self._allowances.get((key_id, period_of(kind, now)))
            known[kind] = cap if allowance is None else allowance.remaining()
        return known

    async def flush(self, idle_seconds: float = IDLE_SECONDS, everything: bool = False) -> None:
        """Give back what idle allowances (all, with ``everything``) hold unused; forget those no
        request uses any more."""
        horizon = time.monotonic() - idle_seconds
        now = self.clock()
        for key, allowance in list(self._allowances.items()):
            current = allowance.period in (period_of(DAY, now), period_of(MONTH, now))
            if everything or not current or allowance.last_used < horizon:
                async with self._lock:
                    await self._give_back_locked(allowance)
                if allowance.used == 0 and allowance.room == 0:
                    self._allowances.pop(key, None)

    async def _give_back_locked(self, allowance: Allowance) -> None:
        """Return the allowance's unused part to the table (the lock held: no take or give-back of
        this process runs meanwhile; requests see the smaller room at once, before the write)."""
        unused = allowance.room
        if unused <= 0:
            return
        allowance.leased -= unused
        where = (_table.c.key_id == allowance.key_id) & (_table.c.period == allowance.period)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(update(_table).where(where).values(leased=_table.c.leased - unused))
        except BaseException:
            allowance.leased += unused  # still ours: the table still counts it
            raise
