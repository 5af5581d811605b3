"""A request's money, start to end, without a database write on the request's path.

Each coordinator process reserves credit for a user in chunks: a *lease* is an ordinary hold in the
ledger (wallet → held, DESIGN §5), taken with the same atomic conditional update, so no process can
ever promise more than the wallet holds. A request's worst case is then carved out of the user's
lease in memory; when the request ends its real charge is booked against the lease and the rest goes
back to it. :meth:`CreditLeases.flush` (a ``periodic`` sweep, every ``POOL_LEDGER_FLUSH_INTERVAL``
seconds) writes the booked charges to the ledger in one transaction per lease, and releases leases
idle for ``idle_seconds``. Only a request that finds no lease with room takes the database round
trip (and a 402 comes from there).

If the process dies, its leases are released by the sweep of another (or the restarted) process:
the consumer gets back everything not yet written, so nobody is ever charged for more than was
delivered; the platform loses at most one flush interval of charges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.money import ledger
from coordinator.money.requestlog import RequestLog, RequestRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Charge:
    """What a finished request costs: ``amount`` for the consumer, who served it, the upstream's cost."""

    amount: int
    provider_user_id: int | None
    upstream_cost: int = 0


class TokenLimits(Protocol):
    """Where a finished request's real token count corrects its estimate (the key's rate limits)."""

    def correct(self, key_id: int, tokens_delta: int) -> None: ...


LOCK_STRIPES = 64  # users share these locks (by id), so there is nothing per user to clean up


@dataclass(eq=False)
class Lease:
    """Credit one process reserved for one user (a pending hold in the ledger)."""

    hold_id: str
    user_id: int
    amount: int
    free: int  # not promised to any running request
    started: float
    last_used: float
    expires: float  # when the sweep would take the hold for abandoned, unless renewed
    in_flight: int = 0
    retiring: bool = False  # a newer lease serves new requests; this one closes once idle
    lost: bool = False  # the hold was resolved under us (we were taken for dead): lend nothing more
    booked: list[ledger.Payout] = field(default_factory=list)
    unsent: tuple[str, list[ledger.Payout]] | None = None  # a batch whose write failed or is in doubt
    unwritten_since: float | None = None  # when its oldest charge not yet in the ledger was booked


@dataclass(eq=False)
class Reservation:
    """One request's part of a lease."""

    lease: Lease
    amount: int


class CreditLeases:
    """This process's credit leases, one per user at a time: requests reserve from them in memory,
    finished requests book their charges on them, and a background loop writes those to the ledger."""

    def __init__(
        self,
        engine: AsyncEngine,
        requests: RequestLog,
        limits: TokenLimits,
        *,
        fee_bps: int,
        hold_ttl: float,
        instance_lease: float,
        chunk: int,
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self._clock = clock  # monotonic seconds: lease ages, idleness and hold renewal
        self.requests = requests
        self.limits = limits
        self.fee_bps = fee_bps
        self.hold_ttl = hold_ttl
        self.instance_lease = instance_lease  # seconds a silent process keeps its holds
        self.chunk = chunk
        self.idle_seconds = idle_seconds
        self.instance_id = "crd_" + secrets.token_hex(8)
        self.started_at = datetime.now(UTC)
        self._current: dict[int, Lease] = {}  # user id -> the lease new requests draw on
        self._leases: dict[str, Lease] = {}  # every open lease, by hold id
        self._opening: set[str] = set()  # holds being written, not yet leases
        self._locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]
        self._flush_lock = asyncio.Lock()
        self._running = 0  # reservations not yet finished
        self._idle = asyncio.Event()
        self.dropped: set[str] = set()  # requests whose charge was dropped with a lost lease: never charged

    @property
    def live(self) -> set[str]:
        """Holds this process still uses (the sweep leaves them alone)."""
        return set(self._leases) | self._opening

    def unspent(self, user_id: int) -> int:
        """Credit this process holds for the user in leases and has not promised to any request."""
        return sum(lease.free for lease in self._leases.values() if lease.user_id == user_id and not lease.lost)

    @property
    def running(self) -> int:
        """Requests holding credit that have not finished."""
        return self._running

    @property
    def open_leases(self) -> int:
        return len(self._leases)

    def flush_lag(self) -> float:
        """Seconds since the oldest charge this process booked but has not yet written to the
        ledger was booked (0 when everything is written): what a crash now would leave unbilled."""
        waiting = [lease.unwritten_since for lease in self._leases.values() if lease.unwritten_since is not None]
        return max(0.0, self._clock() - min(waiting)) if waiting else 0.0

    def _lock(self, user_id: int) -> asyncio.Lock:
        return self._locks[user_id % LOCK_STRIPES]

    # --- the request path ---------------------------------------------------------------------

    async def reserve(self, record: RequestRecord, amount: int) -> Reservation:
        """Promise ``amount`` to the request; :class:`ledger.InsufficientCredits` if the user's wallet
        and leases cannot cover it. Touches the database only when the current lease is short."""
        assert record.user_id is not None
        user_id = record.user_id
        reservation = self._take(self._current.get(user_id), amount)
        if reservation is not None:
            return reservation
        async with self._lock(user_id):
            reservation = self._take(self._current.get(user_id), amount)
            if reservation is not None:
                return reservation
            try:
                lease = await self._grow(user_id, record.key_id, amount)
            except ledger.InsufficientCredits as short:
                # A retiring lease may still have room (its credit is not in the wallet).
                for lease in list(self._leases.values()):
                    if lease.user_id == user_id and (reservation := self._take(lease, amount, retiring=True)):
                        return reservation
                raise ledger.InsufficientCredits(amount, short.available + self.unspent(user_id), short.owed) from None
            reservation = self._take(lease, amount, retiring=True)  # the flush may have retired it meanwhile
        if reservation is None:  # lost while it grew: another process took this one for dead
            raise RuntimeError("credit lease lost while reserving; the coordinator cannot reach its database")
        return reservation

    def _take(self, lease: Lease | None, amount: int, retiring: bool = False) -> Reservation | None:
        if lease is None or lease.lost or (lease.retiring and not retiring) or lease.free < amount:
            return None
        lease.free -= amount
        lease.in_flight += 1
        self._running += 1
        self._idle.clear()
        lease.last_used = self._clock()
        return Reservation(lease, amount)

    async def _grow(self, user_id: int, key_id: int | None, amount: int) -> Lease:
        """Make the user's current lease able to cover ``amount``: add a chunk (or whatever the wallet
        has, if that is enough) to it, or open one. One lease per user keeps every unspent nano in
        one place, so what the wallet and the lease hold together is always usable."""
        lease = self._current.get(user_id)
        if lease is not None and not lease.retiring and not lease.lost:
            hold_id = lease.hold_id
            size = await self._take_from_wallet(
                amount - lease.free, lambda n: ledger.extend(self.engine, hold_id, user_id, n)
            )
            if size is not None:
                lease.amount += size
                lease.free += size
                return lease
            self._lose(lease)

        new_id = "lease_" + secrets.token_hex(10)

        async def open_hold(n: int) -> bool:
            await ledger.hold(self.engine, new_id, user_id, key_id, n, self.instance_id, self.hold_ttl)
            return True

        self._opening.add(new_id)  # from now on the sweep must not take it for orphaned
        try:
            size = await self._take_from_wallet(amount, open_hold)
            assert size is not None
            now = self._clock()
            lease = Lease(new_id, user_id, size, size, now, now, now + self.hold_ttl)
            previous = self._current.get(user_id)
            if previous is not None:
                previous.retiring = True
            self._current[user_id] = lease
            self._leases[new_id] = lease
        finally:
            self._opening.discard(new_id)
        return lease

    async def _take_from_wallet(self, need: int, take: Callable[[int], Awaitable[bool]]) -> int | None:
        """Move a chunk (at least ``need``) from the wallet with ``take``; if the wallet has less
        than a chunk but at least ``need``, all of it. Returns the size moved, ``None`` if ``take``
        found its hold gone; :class:`ledger.InsufficientCredits` if the wallet has less than ``need``."""
        size = max(need, self.chunk)
        try:
            return size if await take(size) else None
        except ledger.InsufficientCredits as short:
            if short.available < need:
                raise
            return short.available if await take(short.available) else None

    def _lose(self, lease: Lease) -> None:
        """The lease's hold was resolved by someone else: stop lending from it."""
        lease.lost, lease.retiring, lease.free = True, True, 0
        if self._current.get(lease.user_id) is lease:
            del self._current[lease.user_id]

    def finish(
        self, record: RequestRecord, charge: Charge | None, reservation: Reservation | None, token_estimate: int = 0
    ) -> None:
        """Book the request's charge against its lease (the rest returns to it) and log the request.
        Synchronous and cheap: the ledger write happens in the background."""
        if record.key_id is not None and token_estimate:
            self.limits.correct(record.key_id, record.prompt_tokens + record.completion_tokens - token_estimate)
        if reservation is not None:
            lease = reservation.lease
            amount = 0 if charge is None else max(0, min(charge.amount, reservation.amount))
            lease.in_flight -= 1
            self._running -= 1
            if not self._running:
                self._idle.set()
            if not lease.lost:
                lease.free += reservation.amount - amount
            lease.last_used = self._clock()
            if charge is not None and (amount or charge.upstream_cost):
                share = ledger.provider_share(amount, self.fee_bps) if charge.provider_user_id is not None else 0
                lease.booked.append(
                    ledger.Payout(amount, charge.provider_user_id, share, charge.upstream_cost, record.id)
                )
                if lease.unwritten_since is None:
                    lease.unwritten_since = lease.last_used
                record.cost, record.provider_earned = amount, share
                record.platform_fee, record.upstream_cost = amount - share, charge.upstream_cost
            else:
                record.cost = 0
        self.requests.add(record)

    # --- writing -----------------------------------------------------------------------------

    async def flush(self, close_all: bool = False, user_id: int | None = None) -> None:
        """Write booked charges; close leases that are idle, retiring or too old; renew the expiry
        of leases still in use. ``close_all`` closes every lease with no request running (on
        shutdown, or for ``user_id`` alone before their balance is read). Raises the first error
        after trying every lease."""
        async with self._flush_lock:
            now = self._clock()
            failure: Exception | None = None
            for lease in list(self._leases.values()):
                if user_id is not None and lease.user_id != user_id:
                    continue
                try:
                    await self._flush_lease(lease, now, close_all)
                except Exception as exc:
                    failure = failure or exc
            renew = [
                lease
                for lease in self._leases.values()
                if (user_id is None or lease.user_id == user_id) and lease.expires - now < self.hold_ttl / 2
            ]
            if renew:
                await ledger.renew_holds(self.engine, [lease.hold_id for lease in renew], self.hold_ttl)
                for lease in renew:
                    lease.expires = now + self.hold_ttl
            if failure is not None:
                raise failure

    async def _flush_lease(self, lease: Lease, now: float, close_all: bool) -> None:
        if lease.unsent is None and lease.booked:
            lease.unsent, lease.booked = ("b" + secrets.token_hex(8), lease.booked), []
        if lease.unsent is not None:
            # Kept until written: a batch whose commit is in doubt is retried under the same id.
            batch_id, payouts = lease.unsent
            written = await ledger.charge(self.engine, lease.hold_id, batch_id, payouts)
            lease.unsent = None
            lease.unwritten_since = now if lease.booked else None  # booked while the batch was written
            if not written:
                log.error("lease resolved under us, charges dropped", extra={"hold_id": lease.hold_id})
                self.dropped.update(p.request_id for p in payouts if p.request_id is not None)
                self._lose(lease)
        old = now - lease.started > self.hold_ttl / 2
        idle = now - lease.last_used > self.idle_seconds
        busy = lease.in_flight or lease.booked or self._lock(lease.user_id).locked()
        if not busy and (close_all or lease.retiring or idle or old):
            if self._current.get(lease.user_id) is lease:
                del self._current[lease.user_id]
            del self._leases[lease.hold_id]  # if the release fails, our own sweep releases it
            await ledger.release(self.engine, lease.hold_id, "lease closed")
        elif old:
            lease.retiring = True

    async def sweep(self) -> int:
        """Renew this process's lease on life and release holds whose process is gone; returns how many."""
        await ledger.renew_instance(self.engine, self.instance_id, self.started_at)
        released = 0
        for hold_id in await ledger.orphaned_holds(self.engine, self.instance_id, self.live, self.instance_lease):
            if await ledger.release(self.engine, hold_id, "orphaned"):
                log.warning("released an orphaned hold", extra={"hold_id": hold_id})
                released += 1
        return released

    async def close(self, wait: float = 5.0) -> None:
        """Let running requests book their charges (for up to ``wait`` seconds), then write every
        charge and release every lease (on shutdown, after the sweeps stopped)."""
        if self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), wait)
        try:
            await self.flush(close_all=True)
        except Exception as exc:  # what is left is released by the next sweep: nobody overpays
            log.error("final ledger flush failed", extra={"error": str(exc)})
