"""Money in and out on SQLite and PostgreSQL, straight through the money layer: a payment's events in
any order and any number of times, refunds and disputes after the credit was spent (debt, blocked,
then paid), escrow and its maturing, payouts through approval, transfer, rejection, failure and
reversal. After each, the books check (``coordinator.money.books``) finds nothing."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from itertools import permutations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core import db
from coordinator.identity import users
from coordinator.money import ledger, payments, payouts
from coordinator.money.ledger import FUNDING, PAID_OUT, debt, earnings, escrow, payout_pending, wallet
from coordinator.money.payments import DISPUTE_CLOSED, DISPUTE_OPEN, Facts
from tests.ledger_checks import balance, ledger_problems

OWNER = "crd_flows"
CENT = 10_000_000


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(db_url)
    await db.migrate(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def new_user(engine: AsyncEngine, credits: int = 0) -> int:
    async with db.sessionmaker(engine)() as session, session.begin():
        user = await users.create_user(session, f"u{secrets.token_hex(4)}@example.com")
        if credits:
            await ledger.grant(await session.connection(), user.id, credits)
        return user.id


async def paid_in(engine: AsyncEngine, user: int, amount: int) -> str:
    payment = payments.new_id()
    await payments.open_payment(engine, payment, user, amount, "checkout")
    assert await payments.apply(
        engine, f"evt_{secrets.token_hex(6)}", "checkout.session.completed", payment, Facts(paid=amount)
    )
    return payment


async def spend(engine: AsyncEngine, consumer: int, provider: int, amount: int, share: int) -> None:
    """One request's charge, through a hold as a credit lease makes it."""
    hold = "lease_" + secrets.token_hex(6)
    await ledger.hold(engine, hold, consumer, None, amount, OWNER, 60)
    assert await ledger.charge(engine, hold, "b1", [ledger.Payout(amount, provider, share, request_id="req_" + hold)])
    assert await ledger.release(engine, hold, "lease closed")


async def test_each_event_applies_once_whatever_the_order(engine: AsyncEngine) -> None:
    """Paid $10, refunded $3 then $5 in all (cumulative totals), a dispute opened on $2 and lost:
    every order of those events, each delivered twice, leaves the same wallet."""
    events = [
        ("checkout.session.completed", Facts(paid=1000 * CENT, payment_intent="pi_1")),
        ("charge.refunded", Facts(refunded=300 * CENT)),
        ("charge.refunded", Facts(refunded=500 * CENT)),
        ("charge.dispute.created", Facts(dispute_stage=DISPUTE_OPEN, disputed=200 * CENT)),
        ("charge.dispute.closed", Facts(dispute_stage=DISPUTE_CLOSED, disputed=200 * CENT)),
    ]
    orders = list(permutations(range(len(events))))[::17]  # a spread of the 120 orders
    funding_before = await balance(engine, FUNDING)
    for order in orders:
        user = await new_user(engine)
        payment = payments.new_id()
        await payments.open_payment(engine, payment, user, 1000 * CENT, "checkout")
        ids = {i: f"evt_{secrets.token_hex(6)}" for i in order}
        for i in [*order, *order]:  # every event twice
            kind, facts = events[i]
            await payments.apply(engine, ids[i], kind, payment, facts)
        assert await balance(engine, wallet(user)) == 300 * CENT, order  # 10 - 5 refunded - 2 lost
        assert await balance(engine, debt(user)) == 0
    assert await balance(engine, FUNDING) - funding_before == -300 * CENT * len(orders)
    assert await ledger_problems(engine) == []


async def test_a_won_dispute_gives_the_credit_back(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    payment = await paid_in(engine, user, 2000 * CENT)
    await payments.apply(
        engine, "evt_dc", "charge.dispute.created", payment, Facts(dispute_stage=DISPUTE_OPEN, disputed=2000 * CENT)
    )
    assert await balance(engine, wallet(user)) == 0
    await payments.apply(
        engine, "evt_dw", "charge.dispute.closed", payment, Facts(dispute_stage=DISPUTE_CLOSED, disputed=0)
    )
    # a late "created" after the close is stale: it cannot reopen the dispute
    await payments.apply(
        engine, "evt_dc2", "charge.dispute.created", payment, Facts(dispute_stage=DISPUTE_OPEN, disputed=2000 * CENT)
    )
    assert await balance(engine, wallet(user)) == 2000 * CENT
    assert await ledger_problems(engine) == []


async def test_a_refund_after_the_credit_was_spent_is_debt_that_blocks_until_paid(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine), await new_user(engine)
    payment = await paid_in(engine, consumer, 500 * CENT)
    await spend(engine, consumer, provider, 400 * CENT, 360 * CENT)
    assert await balance(engine, wallet(consumer)) == 100 * CENT
    applied = await payments.apply(engine, "evt_r", "charge.refunded", payment, Facts(refunded=500 * CENT))
    assert applied is not None and applied.change == -500 * CENT
    assert await balance(engine, wallet(consumer)) == 0
    assert await balance(engine, debt(consumer)) == -400 * CENT
    with pytest.raises(ledger.InsufficientCredits) as short:
        await ledger.hold(engine, "lease_blocked", consumer, None, 1, OWNER, 60)
    assert short.value.owed == 400 * CENT
    await paid_in(engine, consumer, 300 * CENT)  # not enough: all of it pays the debt
    assert (await balance(engine, wallet(consumer)), await balance(engine, debt(consumer))) == (0, -100 * CENT)
    async with engine.begin() as conn:
        await ledger.grant(conn, consumer, 250 * CENT)  # an operator's grant pays the debt first too
    assert (await balance(engine, wallet(consumer)), await balance(engine, debt(consumer))) == (150 * CENT, 0)
    await ledger.hold(engine, "lease_free", consumer, None, 1, OWNER, 60)
    async with engine.connect() as conn:
        assert (await ledger.balances(conn, consumer)).owed == 0
    assert await ledger_problems(engine) == []


async def test_a_release_and_a_refunded_request_pay_debt_first(engine: AsyncEngine) -> None:
    """Credit a lease still held when the debt arose comes back to pay it, as does a request refund."""
    consumer, provider = await new_user(engine), await new_user(engine)
    payment = await paid_in(engine, consumer, 500 * CENT)
    hold = "lease_open"
    await ledger.hold(engine, hold, consumer, None, 200 * CENT, OWNER, 60)
    assert await ledger.charge(engine, hold, "b1", [ledger.Payout(50 * CENT, provider, 45 * CENT, request_id="req_x")])
    await payments.apply(engine, "evt_r", "charge.refunded", payment, Facts(refunded=500 * CENT))
    assert await balance(engine, debt(consumer)) == -200 * CENT  # 300 was in the wallet
    assert await ledger.release(engine, hold, "lease closed")  # 150 unspent comes back
    assert (await balance(engine, wallet(consumer)), await balance(engine, debt(consumer))) == (0, -50 * CENT)
    assert await ledger.refund(engine, "req_x", consumer, provider, 50 * CENT, 45 * CENT)
    assert (await balance(engine, wallet(consumer)), await balance(engine, debt(consumer))) == (0, 0)
    assert await ledger_problems(engine) == []


async def test_concurrent_deliveries_of_one_event_credit_once(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    payment = payments.new_id()
    await payments.open_payment(engine, payment, user, 700 * CENT, "checkout")

    async def deliver() -> payments.Applied | None:
        try:
            return await payments.apply(
                engine, "evt_same", "checkout.session.completed", payment, Facts(paid=700 * CENT)
            )
        except Exception as exc:  # SQLite: a writer that lost the race may be told the database is busy
            if "locked" in str(exc) or "busy" in str(exc):
                return None
            raise

    results = await asyncio.gather(*(deliver() for _ in range(6)))
    assert sum(1 for r in results if r is not None) == 1
    assert await balance(engine, wallet(user)) == 700 * CENT
    assert await ledger_problems(engine) == []


async def test_earnings_mature_after_the_hold_and_refunds_take_escrow_first(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine, 10_000 * CENT), await new_user(engine)
    await spend(engine, consumer, provider, 1000 * CENT, 900 * CENT)
    assert (await balance(engine, escrow(provider)), await balance(engine, earnings(provider))) == (900 * CENT, 0)
    assert await payouts.mature(engine, ledger.now() - timedelta(days=7)) == 0  # too young
    assert await payouts.mature(engine, ledger.now() + timedelta(seconds=1)) == 900 * CENT
    assert await payouts.mature(engine, ledger.now() + timedelta(seconds=1)) == 0  # idempotent
    await spend(engine, consumer, provider, 100 * CENT, 90 * CENT)
    # A refund of 120 of share: 90 from escrow, 30 from matured earnings.
    await asyncio.sleep(0.01)
    assert await ledger.refund(engine, "req_refund", consumer, provider, 130 * CENT, 120 * CENT)
    assert (await balance(engine, escrow(provider)), await balance(engine, earnings(provider))) == (0, 870 * CENT)
    # What left escrow counts against the oldest credits: nothing more matures.
    assert await payouts.mature(engine, ledger.now() + timedelta(seconds=1)) == 0
    assert await ledger_problems(engine) == []


async def test_two_sweeps_at_once_mature_each_nano_once(engine: AsyncEngine) -> None:
    consumer, provider = await new_user(engine, 10_000 * CENT), await new_user(engine)
    for _ in range(3):
        await spend(engine, consumer, provider, 100 * CENT, 90 * CENT)
    cutoff = ledger.now() + timedelta(seconds=1)
    results = await asyncio.gather(*(payouts.mature(engine, cutoff) for _ in range(3)), return_exceptions=True)
    assert await balance(engine, earnings(provider)) == 270 * CENT, results
    assert await balance(engine, escrow(provider)) == 0
    assert await ledger_problems(engine) == []


async def matured_provider(engine: AsyncEngine, share: int) -> int:
    consumer, provider = await new_user(engine, 100_000 * CENT), await new_user(engine)
    await spend(engine, consumer, provider, share * 2, share)
    await payouts.mature(engine, ledger.now() + timedelta(seconds=1))
    return provider


async def test_a_payout_goes_through_approval_and_transfer(engine: AsyncEngine) -> None:
    provider = await matured_provider(engine, 5000 * CENT)
    minimum = 2500 * CENT
    with pytest.raises(payouts.PayoutRefused) as refused:
        await payouts.request(engine, payouts.new_id(), provider, 3000 * CENT, minimum)
    assert refused.value.code == "payout_account_missing"
    await payouts.connect_account(engine, provider, "acct_1")
    assert await payouts.connect_account(engine, provider, "acct_2") == "acct_1"  # one account per user
    with pytest.raises(payouts.PayoutRefused) as refused:
        await payouts.request(engine, payouts.new_id(), provider, 2000 * CENT, minimum)
    assert refused.value.code == "payout_below_minimum"
    with pytest.raises(payouts.PayoutRefused) as refused:
        await payouts.request(engine, payouts.new_id(), provider, 5001 * CENT, minimum)
    assert refused.value.code == "insufficient_earnings"
    paid_out_before = await balance(engine, PAID_OUT)
    first = await payouts.request(engine, payouts.new_id(), provider, 3000 * CENT, minimum)
    assert (first.status, first.destination) == (payouts.REQUESTED, "acct_1")
    assert (await balance(engine, earnings(provider)), await balance(engine, payout_pending(provider))) == (
        2000 * CENT,
        3000 * CENT,
    )
    with pytest.raises(payouts.PayoutRefused):  # only approved payouts are transferred
        await payouts.transferred(engine, first.id, "tr_early")
    assert (await payouts.approve(engine, first.id, "ops@example.com")).status == payouts.APPROVED
    with pytest.raises(payouts.PayoutRefused) as refused:  # a second approval (another operator, a retry)
        await payouts.approve(engine, first.id, "ops2@example.com")
    assert refused.value.code == "payout_state"
    done = await payouts.transferred(engine, first.id, "tr_1")
    assert (done.status, done.transfer_id, done.decided_by) == (payouts.PAID, "tr_1", "ops@example.com")
    assert await balance(engine, payout_pending(provider)) == 0
    assert await balance(engine, PAID_OUT) - paid_out_before == 3000 * CENT
    # A transfer reversed after it was made: the amount is the provider's again.
    reversed_ = await payouts.failed(engine, first.id, "reversed", was=payouts.PAID)
    assert reversed_.status == payouts.FAILED
    assert await balance(engine, earnings(provider)) == 5000 * CENT
    assert await balance(engine, PAID_OUT) == paid_out_before
    assert await ledger_problems(engine) == []


async def test_rejected_and_failed_payouts_return_to_earnings(engine: AsyncEngine) -> None:
    provider = await matured_provider(engine, 5000 * CENT)
    await payouts.connect_account(engine, provider, "acct_r")
    rejected = await payouts.request(engine, payouts.new_id(), provider, 3000 * CENT, 100 * CENT)
    assert (await payouts.reject(engine, rejected.id, "ops", "unknown account holder")).status == payouts.REJECTED
    assert await balance(engine, earnings(provider)) == 5000 * CENT
    failing = await payouts.request(engine, payouts.new_id(), provider, 5000 * CENT, 100 * CENT)
    await payouts.approve(engine, failing.id, "ops")
    assert (await payouts.failed(engine, failing.id, "account closed")).failure == "account closed"
    assert await balance(engine, earnings(provider)) == 5000 * CENT
    with pytest.raises(payouts.PayoutRefused):  # a failed payout is final
        await payouts.transferred(engine, failing.id, "tr_late")
    assert [p.status for p in await payouts.listed(engine, user_id=provider)] == [payouts.FAILED, payouts.REJECTED]
    assert await ledger_problems(engine) == []


async def test_concurrent_payout_requests_cannot_overdraw_earnings(engine: AsyncEngine) -> None:
    provider = await matured_provider(engine, 5000 * CENT)
    await payouts.connect_account(engine, provider, "acct_c")

    async def ask() -> bool:
        try:
            await payouts.request(engine, payouts.new_id(), provider, 3000 * CENT, 100 * CENT)
            return True
        except payouts.PayoutRefused:
            return False
        except Exception as exc:  # SQLite: busy; PostgreSQL: the check constraint is the backstop
            if any(word in str(exc) for word in ("locked", "busy", "ck_accounts")):
                return False
            raise

    results = await asyncio.gather(*(ask() for _ in range(4)))
    assert sum(results) == 1
    assert await balance(engine, earnings(provider)) == 2000 * CENT
    assert await ledger_problems(engine) == []


async def test_the_books_check_reports_an_unbalanced_transaction(engine: AsyncEngine) -> None:
    user = await new_user(engine, 100)
    tx = "tx_broken_" + secrets.token_hex(4)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO ledger_transactions (id, kind, ref, created_at) "
                "VALUES (:id, 'grant', NULL, CURRENT_TIMESTAMP)"
            ),
            {"id": tx},
        )
        await conn.execute(
            text("INSERT INTO ledger_entries (tx_id, account_id, amount) VALUES (:tx, :acc, 5)"),
            {"tx": tx, "acc": wallet(user)},
        )
    problems = await ledger_problems(engine)
    assert f"transaction {tx} sums to 5" in problems
    assert any(p.startswith(f"account {wallet(user)} stores") for p in problems)
    async with engine.begin() as conn:  # entries are append-only: a correcting entry puts it right
        await conn.execute(
            text("INSERT INTO ledger_entries (tx_id, account_id, amount) VALUES (:tx, :acc, -5)"),
            {"tx": tx, "acc": wallet(user)},
        )
    assert await ledger_problems(engine) == []


async def test_one_crossing_of_the_threshold_is_fired_once_and_rearms_only_back_above(engine: AsyncEngine) -> None:
    user = await new_user(engine, 300 * CENT)
    assert not await payments.set_auto(engine, user, True, 500 * CENT, 1000 * CENT)  # no card saved
    await payments.save_method(engine, user, "cus_1", "pm_1")
    assert await payments.set_auto(engine, user, True, 500 * CENT, 1000 * CENT)
    [due] = [a for a in await payments.due(engine) if a.user_id == user]

    async def fire() -> bool:
        try:
            return await payments.disarm(engine, user, due.fired)
        except Exception as exc:  # SQLite: a writer that lost the race may find the database busy
            if "locked" in str(exc) or "busy" in str(exc):
                return False
            raise

    assert sum(await asyncio.gather(*(fire() for _ in range(5)))) == 1
    assert user not in {a.user_id for a in await payments.due(engine)}
    await payments.rearm(engine)  # still under the threshold: not armed again
    assert user not in {a.user_id for a in await payments.due(engine)}
    await paid_in(engine, user, 300 * CENT)  # $6: back over $5
    await payments.rearm(engine)
    auto = await payments.auto_of(engine, user)
    assert auto is not None and auto.armed and auto.fired == 1
    assert await payments.disarm(engine, user, auto.fired)  # crossing 1 taken; its charge never came back
    later = ledger.now() + timedelta(minutes=2)
    [stuck] = [a for a in await payments.stalled(engine, later, later - timedelta(hours=23)) if a.user_id == user]
    assert stuck.fired == 2  # retried as crossing 1: the same payment and idempotency key
    await payments.open_payment(engine, payments.crossing_id(user, 1), user, 1000 * CENT, "auto")
    await payments.apply(
        engine, "evt_auto", "payment_intent.succeeded", payments.crossing_id(user, 1), Facts(paid=1000 * CENT)
    )
    assert user not in {a.user_id for a in await payments.stalled(engine, later, later - timedelta(hours=23))}
    await payments.auto_failed(engine, user, "declined")
    assert (await payments.auto_of(engine, user)).enabled is False  # type: ignore[union-attr]


async def test_no_payout_while_a_chargeback_left_a_debt(engine: AsyncEngine) -> None:
    """Top up by card, spend it on one's own agent, cash out, dispute the card: the dispute leaves a
    debt, and no payout is made before it is paid."""
    user = await matured_provider(engine, 5000 * CENT)  # earnings of its own
    await payouts.connect_account(engine, user, "acct_d")
    payment = await paid_in(engine, user, 1000 * CENT)
    await spend(engine, user, await new_user(engine), 1000 * CENT, 900 * CENT)
    await payments.apply(
        engine, "evt_lost", "charge.dispute.closed", payment, Facts(dispute_stage=DISPUTE_CLOSED, disputed=1000 * CENT)
    )
    with pytest.raises(payouts.PayoutRefused) as refused:
        await payouts.request(engine, payouts.new_id(), user, 100 * CENT, 100 * CENT)
    assert refused.value.code == "debt_outstanding"
    async with engine.begin() as conn:
        await ledger.grant(conn, user, 1000 * CENT)  # paid
    assert (await payouts.request(engine, payouts.new_id(), user, 100 * CENT, 100 * CENT)).status == payouts.REQUESTED
    assert await ledger_problems(engine) == []
