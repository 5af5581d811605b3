"""The money path on SQLite and PostgreSQL: holds, charges, releases, top-ups, the orphan sweep."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core import db
from coordinator.core.ratelimit import KeyLimits
from coordinator.identity import users
from coordinator.money import ledger
from coordinator.money.clawback import Clawback
from coordinator.money.leases import Charge, CreditLeases, Reservation
from coordinator.money.ledger import FUNDING, PLATFORM_FEES, UPSTREAM_COSTS, escrow, held, wallet
from coordinator.money.requestlog import RequestLog, RequestRecord
from tests.ledger_checks import balance, ledger_problems, pending_holds

OWNER = "crd_test"


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(db_url)
    await db.migrate(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


class Skip:
    """Time skipped instead of slept: billing's wall clock (``ledger.now``, patched by the ``skip``
    fixture) and :meth:`monotonic` (an :class:`CreditLeases`'s clock) run ``seconds`` ahead of the real ones."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, seconds: float) -> None:
        self.seconds += seconds

    def monotonic(self) -> float:
        return time.monotonic() + self.seconds


@pytest.fixture
def skip(monkeypatch: pytest.MonkeyPatch) -> Skip:
    skipped = Skip()
    real = ledger.now
    monkeypatch.setattr(ledger, "now", lambda: real() + timedelta(seconds=skipped.seconds))
    return skipped


async def new_user(engine: AsyncEngine, credits: int = 0) -> int:
    async with db.sessionmaker(engine)() as session, session.begin():
        user = await users.create_user(session, f"u{secrets.token_hex(4)}@example.com")
        if credits:
            await ledger.grant(await session.connection(), user.id, credits)
        return user.id


def hold_id() -> str:
    return "req_" + secrets.token_hex(8)


async def test_a_charge_pays_the_provider_its_share_and_the_release_returns_the_rest(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine, 10_000), await new_user(engine)
    fees_before = await balance(engine, PLATFORM_FEES)
    h = hold_id()
    await ledger.hold(engine, h, consumer, None, 3_000, OWNER, 60)
    assert (await balance(engine, wallet(consumer)), await balance(engine, held(consumer))) == (7_000, 3_000)
    share = ledger.provider_share(1_001, 1_000)
    assert share == 900
    assert await ledger.charge(engine, h, "b1", [ledger.Payout(1_001, provider, share)])
    assert await balance(engine, held(consumer)) == 3_000 - 1_001  # the lease stays open
    assert await ledger.release(engine, h, "lease closed")
    assert await balance(engine, wallet(consumer)) == 10_000 - 1_001
    assert await balance(engine, held(consumer)) == 0
    assert await balance(engine, escrow(provider)) == 900
    assert await balance(engine, PLATFORM_FEES) - fees_before == 101
    assert await ledger_problems(engine) == []


async def test_charges_never_exceed_the_hold(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine, 5_000), await new_user(engine)
    h = hold_id()
    await ledger.hold(engine, h, consumer, None, 2_000, OWNER, 60)
    assert not await ledger.charge(engine, h, "b1", [ledger.Payout(2_001, provider, 1_500)])
    split = [ledger.Payout(1_500, provider, 1_125), ledger.Payout(600, provider, 450)]
    assert not await ledger.charge(engine, h, "b2", split)  # together more than the hold: none of it
    assert await balance(engine, held(consumer)) == 2_000 and await balance(engine, escrow(provider)) == 0
    assert await ledger.charge(engine, h, "b3", [ledger.Payout(2_000, provider, 1_500)])
    assert not await ledger.charge(engine, h, "b4", [ledger.Payout(1, provider, 0)])
    assert await ledger.release(engine, h, "lease closed")
    assert await balance(engine, wallet(consumer)) == 3_000
    assert await balance(engine, escrow(provider)) == 1_500
    assert await ledger_problems(engine) == []


async def test_fallback_charges_the_pool_price_and_records_the_upstream_cost(engine: AsyncEngine) -> None:
    consumer = await new_user(engine, 5_000)
    fees_before = await balance(engine, PLATFORM_FEES)
    costs_before = await balance(engine, UPSTREAM_COSTS)
    h = hold_id()
    await ledger.hold(engine, h, consumer, None, 1_000, OWNER, 60)
    assert await ledger.charge(engine, h, "b1", [ledger.Payout(800, None, 0, upstream_cost=300)])
    assert await ledger.release(engine, h, "lease closed")
    assert await balance(engine, wallet(consumer)) == 5_000 - 800
    assert await balance(engine, PLATFORM_FEES) - fees_before == 800 - 300
    assert await balance(engine, UPSTREAM_COSTS) - costs_before == 300
    assert await ledger_problems(engine) == []


async def test_a_hold_resolves_exactly_once(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine, 10_000), await new_user(engine)
    first, second = hold_id(), hold_id()
    await ledger.hold(engine, first, consumer, None, 1_000, OWNER, 60)
    assert await ledger.release(engine, first, "cancelled")
    assert not await ledger.charge(engine, first, "b1", [ledger.Payout(500, provider, 500)])
    assert not await ledger.release(engine, first, "again")
    await ledger.hold(engine, second, consumer, None, 1_000, OWNER, 60)
    outcomes = await asyncio.gather(
        ledger.charge(engine, second, "b1", [ledger.Payout(400, provider, 400)]),
        ledger.release(engine, second, "race"),
        ledger.release(engine, second, "race"),
        ledger.charge(engine, second, "b2", [ledger.Payout(500, provider, 500)]),
        return_exceptions=True,
    )
    assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
    assert [outcomes[1], outcomes[2]].count(True) == 1  # one release wins
    charged = 400 * (outcomes[0] is True) + 500 * (outcomes[3] is True)  # charges that came first count
    assert await balance(engine, held(consumer)) == 0
    assert await balance(engine, wallet(consumer)) == 10_000 - charged
    assert await balance(engine, escrow(provider)) == charged
    assert await ledger_problems(engine) == []


async def test_concurrent_holds_never_overspend(engine: AsyncEngine) -> None:
    consumer = await new_user(engine, 10 * 777)
    results = await asyncio.gather(
        *(ledger.hold(engine, hold_id(), consumer, None, 777, OWNER, 60) for _ in range(100)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, ledger.InsufficientCredits)]
    others = [r for r in results if isinstance(r, BaseException) and not isinstance(r, ledger.InsufficientCredits)]
    assert others == []
    assert (len(results) - len(refused), len(refused)) == (10, 90)
    assert await balance(engine, wallet(consumer)) == 0
    assert await balance(engine, held(consumer)) == 10 * 777
    assert await ledger_problems(engine) == []


async def test_insufficient_credits_changes_nothing(engine: AsyncEngine) -> None:
    consumer = await new_user(engine, 100)
    with pytest.raises(ledger.InsufficientCredits) as refused:
        await ledger.hold(engine, hold_id(), consumer, None, 101, OWNER, 60)
    assert (refused.value.needed, refused.value.available) == (101, 100)
    assert await balance(engine, wallet(consumer)) == 100
    assert await balance(engine, held(consumer)) == 0
    assert await ledger_problems(engine) == []


async def test_topup_is_idempotent(engine: AsyncEngine) -> None:
    consumer = await new_user(engine)
    funding_before = await balance(engine, FUNDING)
    key = "topup-" + secrets.token_hex(4)
    results = await asyncio.gather(*(ledger.topup(engine, key, consumer, 2_500) for _ in range(5)))
    assert len({r.tx_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert await balance(engine, wallet(consumer)) == 2_500
    assert await balance(engine, FUNDING) == funding_before - 2_500
    with pytest.raises(ledger.IdempotencyConflict):
        await ledger.topup(engine, key, consumer, 2_501)
    assert await balance(engine, wallet(consumer)) == 2_500
    assert await ledger_problems(engine) == []


async def test_ledger_entries_are_append_only(engine: AsyncEngine) -> None:
    consumer = await new_user(engine, 1_000)
    for statement in ("UPDATE ledger_entries SET amount = amount + 1", "DELETE FROM ledger_entries"):
        with pytest.raises((IntegrityError, DBAPIError)):
            async with engine.begin() as conn:
                await conn.execute(text(statement))
    with pytest.raises((IntegrityError, DBAPIError)):
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE accounts SET balance = -1 WHERE id = :id"), {"id": wallet(consumer)})
    assert await balance(engine, wallet(consumer)) == 1_000
    assert await ledger_problems(engine) == []


async def test_sweep_releases_holds_of_dead_and_forgotten_requests(engine: AsyncEngine, skip: Skip) -> None:
    consumer = await new_user(engine, 10_000)
    started = datetime.now(UTC)
    dead, alive, other = ("crd_" + name + secrets.token_hex(3) for name in ("dead_", "alive_", "other_"))
    for instance in (dead, alive, other):
        await ledger.renew_instance(engine, instance, started)
    crashed, running, forgotten, expired, overdue = (hold_id() for _ in range(5))
    await ledger.hold(engine, crashed, consumer, None, 1_000, dead, 600)
    await ledger.hold(engine, running, consumer, None, 1_000, alive, 600)
    await ledger.hold(engine, forgotten, consumer, None, 1_000, alive, 600)
    await ledger.hold(engine, expired, consumer, None, 1_000, other, 0.01)  # a live instance's hold past its TTL
    await ledger.hold(engine, overdue, consumer, None, 1_000, alive, 0.01)  # past its TTL, but still running here
    skip(2.2)  # the dead instance's lease (2 s) runs out; holds pass their 2 s grace
    await ledger.renew_instance(engine, alive, started)
    await ledger.renew_instance(engine, other, started)
    orphans = await ledger.orphaned_holds(engine, alive, live={running, overdue}, lease=2.0)
    assert sorted(orphans) == sorted([crashed, forgotten, expired])
    for orphan in orphans:
        assert await ledger.release(engine, orphan, "orphaned")
    assert await pending_holds(engine) == 2
    assert await balance(engine, wallet(consumer)) == 8_000
    assert await ledger_problems(engine) == []


async def test_a_lease_takes_batched_charges_then_returns_the_rest(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine, 10_000), await new_user(engine)
    fees_before, costs_before = await balance(engine, PLATFORM_FEES), await balance(engine, UPSTREAM_COSTS)
    lease = hold_id()
    await ledger.hold(engine, lease, consumer, None, 5_000, OWNER, 60)
    batch = [
        ledger.Payout(1_000, provider, 900),
        ledger.Payout(500, provider, 450),
        ledger.Payout(800, None, 0, upstream_cost=300),
    ]
    assert await ledger.charge(engine, lease, "b1", batch)
    assert await ledger.charge(engine, lease, "b1", batch)  # a retried batch is written once
    assert await balance(engine, held(consumer)) == 5_000 - 2_300
    assert await balance(engine, escrow(provider)) == 1_350
    assert await balance(engine, PLATFORM_FEES) - fees_before == 100 + 50 + 800 - 300
    assert await balance(engine, UPSTREAM_COSTS) - costs_before == 300
    assert not await ledger.charge(engine, lease, "b2", [ledger.Payout(2_701, provider, 0)])  # more than is left
    with pytest.raises(ValueError):
        await ledger.charge(engine, lease, "b3", [ledger.Payout(10, provider, 11)])
    assert await ledger_problems(engine) == []
    assert await ledger.release(engine, lease, "lease closed")
    assert not await ledger.charge(engine, lease, "b4", [ledger.Payout(1, provider, 0)])
    assert await balance(engine, wallet(consumer)) == 10_000 - 2_300
    assert await balance(engine, held(consumer)) == 0
    assert await ledger_problems(engine) == []


def accounting(
    engine: AsyncEngine, chunk: int, hold_ttl: float = 600, clock: Callable[[], float] = time.monotonic
) -> CreditLeases:
    return CreditLeases(
        engine,
        RequestLog(engine),
        KeyLimits(600, 1_000_000),
        fee_bps=1_000,
        hold_ttl=hold_ttl,
        instance_lease=30,
        chunk=chunk,
        idle_seconds=60,
        clock=clock,
    )


async def test_leases_serve_exactly_what_the_wallet_covers_and_strand_nothing(engine: AsyncEngine) -> None:
    """Leases smaller than the wallet grow in place: ten 300-nano reservations fit a 3,000 wallet
    with 1,000 chunks (three leases would strand 100 each), the eleventh is refused."""
    consumer, provider = await new_user(engine, 3_000), await new_user(engine)
    books = accounting(engine, chunk=1_000)
    records = [RequestRecord(id=hold_id(), user_id=consumer, key_id=None) for _ in range(11)]
    results = await asyncio.gather(*(books.reserve(r, 300) for r in records), return_exceptions=True)
    served = [(r, res) for r, res in zip(records, results, strict=True) if isinstance(res, Reservation)]
    refused = [res for res in results if isinstance(res, ledger.InsufficientCredits)]
    assert (len(served), len(refused)) == (10, 1)
    assert refused[0].available == 0
    assert len(books.live) == 1  # one lease, grown three times
    assert await balance(engine, wallet(consumer)) == 0
    for record, reservation in served:
        books.finish(record, Charge(100, provider), reservation)
        assert record.cost == 100 and record.provider_earned == 90
    assert await balance(engine, escrow(provider)) == 0  # booked, not yet written
    await books.flush(close_all=True, user_id=consumer)
    assert books.live == set()
    assert await balance(engine, wallet(consumer)) == 3_000 - 1_000
    assert await balance(engine, held(consumer)) == 0
    assert await balance(engine, escrow(provider)) == 900
    assert await pending_holds(engine) == 0
    assert await ledger_problems(engine) == []


async def test_a_retiring_lease_still_serves_when_the_wallet_is_empty(engine: AsyncEngine) -> None:
    consumer = await new_user(engine, 1_000)
    books = accounting(engine, chunk=10_000)  # bigger than the wallet: the lease takes all of it
    first = RequestRecord(id=hold_id(), user_id=consumer, key_id=None)
    running = await books.reserve(first, 400)
    running.lease.retiring = True  # as when a lease reaches half the hold TTL
    second = RequestRecord(id=hold_id(), user_id=consumer, key_id=None)
    late = await books.reserve(second, 600)
    assert late.lease is running.lease
    with pytest.raises(ledger.InsufficientCredits):
        await books.reserve(RequestRecord(id=hold_id(), user_id=consumer, key_id=None), 1)
    books.finish(first, None, running)  # failed before output: nothing charged
    books.finish(second, Charge(250, None), late)
    await books.close()
    assert await balance(engine, wallet(consumer)) == 1_000 - 250
    assert await pending_holds(engine) == 0
    assert await ledger_problems(engine) == []


async def test_a_lease_released_under_us_lends_nothing_more(engine: AsyncEngine) -> None:
    """If another process takes this one for dead and releases its lease, the booked charges are
    dropped (the consumer keeps the credit) and new requests get a new lease."""
    consumer, provider = await new_user(engine, 5_000), await new_user(engine)
    books = accounting(engine, chunk=10_000)
    first = RequestRecord(id=hold_id(), user_id=consumer, key_id=None)
    running = await books.reserve(first, 1_000)
    assert await ledger.release(engine, running.lease.hold_id, "orphaned")  # another process's sweep
    books.finish(first, Charge(500, provider), running)
    await books.flush()
    assert running.lease.lost and books.unspent(consumer) == 0
    assert await balance(engine, wallet(consumer)) == 5_000 and await balance(engine, escrow(provider)) == 0
    clawback = Clawback(engine, books)  # a dropped charge is never refunded: it was never paid
    first.provider_user_id = provider
    clawback.served(1, "agt_1", "m", first)
    clawback.discredited(1, "m")
    assert await clawback.refund_due() == 0 and clawback.due == []
    assert await balance(engine, wallet(consumer)) == 5_000
    second = RequestRecord(id=hold_id(), user_id=consumer, key_id=None)
    fresh = await books.reserve(second, 1_000)
    assert fresh.lease is not running.lease and books.unspent(consumer) == 4_000
    books.finish(second, Charge(700, provider), fresh)
    await books.close()
    assert books.live == set()
    assert await balance(engine, wallet(consumer)) == 5_000 - 700
    assert await balance(engine, escrow(provider)) == 630
    assert await pending_holds(engine) == 0
    assert await ledger_problems(engine) == []


async def test_a_lease_in_use_keeps_its_hold_from_expiring(engine: AsyncEngine, skip: Skip) -> None:
    consumer = await new_user(engine, 5_000)
    books = accounting(engine, chunk=1_000, hold_ttl=2.0, clock=skip.monotonic)
    record = RequestRecord(id=hold_id(), user_id=consumer, key_id=None)
    running = await books.reserve(record, 100)

    async def expires_at() -> datetime:
        async with engine.connect() as conn:
            value = await conn.scalar(
                text("SELECT expires_at FROM holds WHERE id = :id"), {"id": running.lease.hold_id}
            )
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))

    created = await expires_at()
    await books.flush()
    assert await expires_at() == created  # not yet half the TTL: left as it is
    skip(1.2)  # past half the TTL: the next flush renews it
    await books.flush()
    assert (await expires_at() - created).total_seconds() >= 1.0
    books.finish(record, None, running)
    await books.close()
    assert await pending_holds(engine) == 0


async def test_flush_lag_is_the_age_of_the_oldest_charge_not_yet_written(engine: AsyncEngine, skip: Skip) -> None:
    consumer, provider = await new_user(engine, 5_000), await new_user(engine)
    books = accounting(engine, chunk=1_000, clock=skip.monotonic)
    records = [RequestRecord(id=hold_id(), user_id=consumer, key_id=None) for _ in range(2)]
    reservations = [await books.reserve(record, 100) for record in records]
    assert books.flush_lag() == 0.0 and books.open_leases == 1
    books.finish(records[0], Charge(50, provider), reservations[0])
    skip(0.5)
    books.finish(records[1], Charge(50, provider), reservations[1])  # a later charge leaves the age as it is
    skip(0.25)
    assert 0.75 <= books.flush_lag() < 0.75 + 5  # since the first charge (the clock also runs for real)
    await books.flush()
    assert books.flush_lag() == 0.0
    await books.close()
    assert await balance(engine, escrow(provider)) == 90


async def test_a_failed_canary_refunds_the_jobs_since_the_last_passed_one_once(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine, 10_000), await new_user(engine)
    fees_before = await balance(engine, PLATFORM_FEES)
    books = accounting(engine, chunk=1_000)
    clawback = Clawback(engine, books)
    records = [RequestRecord(id=hold_id(), user_id=consumer, key_id=None, provider_user_id=provider) for _ in range(4)]
    for record in records:
        books.finish(record, Charge(200, provider), await books.reserve(record, 300))
    clawback.served(7, "agt_7", "m", records[0])
    clawback.vouched(7, "agt_7", "m", time.monotonic())  # a canary for m passed: the first job stands
    clawback.served(7, "agt_7", "m", records[1])
    clawback.served(7, "agt_7", "m", records[2])
    clawback.served(7, "agt_7", "other", records[3])  # another model of the same agent is not discredited
    clawback.discredited(7, "m")
    assert await clawback.refund_due() == 2  # the batched charges are written first, then undone
    await books.close()
    assert await balance(engine, wallet(consumer)) == 10_000 - 2 * 200
    assert await balance(engine, escrow(provider)) == 2 * 180
    assert await balance(engine, PLATFORM_FEES) - fees_before == 2 * 20
    assert not await ledger.refund(engine, records[1].id, consumer, provider, 200, 180)  # once per request
    async with engine.connect() as conn:
        marked = dict((await conn.execute(text("SELECT id, refunded FROM request_log"))).all())
    assert [bool(marked[r.id]) for r in records] == [False, True, True, False]  # the log says which
    with pytest.raises(IntegrityError):  # and the database refuses a second refund of a request
        async with engine.begin() as conn:
            await ledger.post(conn, "refund", records[1].id, [(wallet(consumer), 1), (PLATFORM_FEES, -1)])
    assert await ledger_problems(engine) == []


async def test_a_refund_takes_from_the_platform_what_the_provider_no_longer_holds(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine, 1_000), await new_user(engine)
    fees_before = await balance(engine, PLATFORM_FEES)
    h = hold_id()
    await ledger.hold(engine, h, consumer, None, 500, OWNER, 60)
    assert await ledger.charge(engine, h, "b1", [ledger.Payout(500, provider, ledger.provider_share(500, 1_000))])
    assert await ledger.release(engine, h, "lease closed")
    assert await ledger.refund(engine, h, consumer, provider, 500, 450)
    assert await ledger.refund(engine, "req_other", consumer, provider, 100, 90)  # earnings are empty now
    assert await balance(engine, escrow(provider)) == 0
    assert await balance(engine, wallet(consumer)) == 1_000 - 500 + 500 + 100
    assert await balance(engine, PLATFORM_FEES) - fees_before == 50 - 50 - 100
    with pytest.raises(ValueError):
        await ledger.refund(engine, "req_bad", consumer, provider, 100, 101)
    assert await ledger_problems(engine) == []


async def test_a_failed_canary_refunds_jobs_served_before_a_restart_within_the_escrow_period(
    engine: AsyncEngine,
) -> None:
    """Jobs served and logged by one coordinator; it stops, and the next one (a new clawback and new
    leases: nothing in memory) sees the token's canaries fail: the logged jobs since the last passed
    canary are refunded, once, and those from before it stand, as do those older than the escrow."""
    consumer, provider = await new_user(engine, 10_000), await new_user(engine)
    before = accounting(engine, chunk=1_000)
    first = Clawback(engine, before)

    async def serve(books: CreditLeases, clawback: Clawback, slug: str = "m", token: int = 7) -> RequestRecord:
        record = RequestRecord(
            id=hold_id(), user_id=consumer, key_id=None, model=slug, provider_user_id=provider, agent_token_id=token
        )
        books.finish(record, Charge(200, provider), await books.reserve(record, 300))
        record.cost, record.provider_earned = 200, 180
        clawback.served(token, "agt_7", slug, record)
        return record

    old = await serve(before, first)
    await asyncio.sleep(0.02)  # stored times apart
    first.vouched(7, "agt_7", "m", time.monotonic())  # a canary passed: the first job stands
    await first.refund_due()  # the sweep writes the vouch
    await asyncio.sleep(0.02)
    kept = [await serve(before, first) for _ in range(2)]
    other = await serve(before, first, slug="other")  # another model of the token: not discredited
    stranger = await serve(before, first, token=8)  # another token
    await before.close()  # the coordinator stops: its leases and request log are written
    await before.requests.close()
    after = accounting(engine, chunk=1_000)  # a new coordinator
    second = Clawback(engine, after, confirmations=2)
    assert not second.disagreed(7, "m", "p1")
    assert second.disagreed(7, "m", "p2")  # confirmed: its logged jobs are due
    assert await second.refund_due() == 2
    assert await second.refund_due() == 0
    refunded = await refunded_ids(engine)
    assert refunded == {r.id for r in kept}
    assert old.id not in refunded and other.id not in refunded and stranger.id not in refunded
    # A third coordinator whose escrow reaches back no further than now: nothing more.
    third = Clawback(engine, accounting(engine, chunk=1_000), confirmations=1, reach=0.0)
    third.disagreed(8, "m", "p1")
    assert await third.refund_due() == 0
    assert await ledger_problems(engine) == []


async def refunded_ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return {row[0] for row in (await conn.execute(text("SELECT id FROM request_log WHERE refunded"))).all()}
