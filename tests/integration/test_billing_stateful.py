"""A Hypothesis state machine over the money path, on SQLite and PostgreSQL.

Random sequences of top-ups (new, replayed, conflicting, concurrent), holds (fitting, too large,
concurrent), credit leases as the coordinator's request path uses them (holds grown in place, charged
in batches: with or without a provider, with an upstream cost, retried), releases, repeated and
concurrent resolutions (a charge racing a release), coordinator crashes and orphan sweeps; payments
from the payment provider and their refunds and disputes (events replayed, totals that only grow),
which leave debt when the credit was spent; refunds of requests; earnings maturing out of escrow;
payouts requested, approved, rejected, transferred, failed and reversed. After every step the
database must agree with a plain Python model of every wallet, holds, escrow, earnings, pending
payouts and debt balance, of the platform accounts and of every hold, and :func:`ledger_problems`
must find nothing: no balance of the wrong sign, every transaction sums to zero, stored balances
equal the replay of the ledger, held balances equal the pending holds, no hold charged above what
it held, no wallet in credit while its user owes, pending payouts equal the open payouts.

One engine and one event loop per test; each example (machine) works on fresh users in the same
database, so the ledger checks cover everything every earlier example left behind.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core import db
from coordinator.core.models import Account, Hold
from coordinator.identity import users
from coordinator.money import ledger, payments, payouts
from coordinator.money.ledger import FUNDING, PAID_OUT, PENDING, PLATFORM_FEES, RELEASED, UPSTREAM_COSTS
from coordinator.money.payments import DISPUTE_CLOSED, DISPUTE_OPEN, Facts
from tests.ledger_checks import ledger_problems

T = TypeVar("T")

CONSUMERS = (0, 1)  # indexes into the machine's users
PROVIDER = 2
RACER = 3  # a consumer whose holds only the race rule touches: no later draw depends on its balances
SHORT_LEASE = 0.001  # every instance but the sweeping one is dead
LONG_LEASE = 3600.0  # only instances that never renewed are dead
PLATFORM = (FEES, UPSTREAM, FUNDING, OUT) = (PLATFORM_FEES, UPSTREAM_COSTS, FUNDING, PAID_OUT)
PAYOUT_STEPS = st.sampled_from(["approve", "reject", "transferred", "failed", "reversed"])

# Small amounts make "more than the wallet" common; a few are above int32 (nano-USD: $2.15 and up).
BIG = st.sampled_from([2**31 - 1, 2**31 + 7, 5_000_000_000])
AMOUNTS = st.one_of(st.integers(0, 120), BIG)
TOPUPS = st.one_of(st.integers(0, 150), BIG)
FEE_BPS = st.one_of(st.sampled_from([0, 1, 1_000, 9_999, 10_000]), st.integers(0, 10_000))
UPSTREAM_COST = st.one_of(st.just(0), st.integers(0, 200), BIG)
RESOLVERS = st.sampled_from(["charge", "release"])


@dataclass
class HoldModel:
    user: int
    amount: int
    owner: str
    expired: bool  # created with a TTL of 0
    status: str = PENDING
    charged: int = 0


@dataclass(frozen=True)
class PayoutArgs:
    """One finished request's charge, as drawn: ``charge`` may be out of range (the payout caps it)."""

    charge: int
    provider: int | None  # a user id, None for the platform upstream (fallback)
    fee_bps: int
    upstream_cost: int


def payout_args(left: int) -> st.SearchStrategy[PayoutArgs]:
    """A charge around what the lease has left (below zero, zero, within, just above, far above)
    and who served it."""
    charges = st.one_of(st.integers(-3, left + 3), st.just(left), AMOUNTS)
    served_by = st.sampled_from([None, PROVIDER, CONSUMERS[1]])  # a consumer can be a provider too
    return st.builds(
        lambda charge, who, fee, cost: PayoutArgs(charge, who, fee, cost if who is None else 0),
        charges,
        served_by,
        FEE_BPS,
        UPSTREAM_COST,
    )


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


@dataclass
class PaymentModel:
    user: int
    paid: int = 0
    refunded: int = 0
    stage: int = 0
    disputed: int = 0
    credited: int = 0
    events: list[tuple[str, str, Facts]] | None = None  # delivered: (id, type, facts), to replay


class BillingMachine(RuleBasedStateMachine):
    def __init__(self, loop: asyncio.AbstractEventLoop, engine: AsyncEngine) -> None:
        super().__init__()
        self.loop = loop
        self.engine = engine
        self.users = [self.run(self._new_user()) for _ in range(4)]
        self.available = dict.fromkeys(self.users, 0)
        self.escrowed = dict.fromkeys(self.users, 0)
        self.matured = dict.fromkeys(self.users, 0)
        self.pending_payouts = dict.fromkeys(self.users, 0)
        self.owed = dict.fromkeys(self.users, 0)
        self.payments: dict[str, PaymentModel] = {}
        self.payouts: dict[str, tuple[int, int, str]] = {}  # id -> (user, amount, status)
        self.refunded_requests: list[tuple[str, int, int, int, int]] = []
        self.platform_start = self.run(self._platform_balances())
        self.platform = dict.fromkeys(PLATFORM, 0)  # expected change since this machine started
        self.holds: dict[str, HoldModel] = {}
        self.refused: list[str] = []  # hold ids that InsufficientCredits turned away
        self.raced: list[str] = []  # holds won in a race of holds, released right after
        self.topups: dict[str, tuple[int, int, str]] = {}  # key -> (user id, amount, tx id)
        self.instance = new_id("crd_")
        self.started_at = datetime.now(UTC)
        self.renewed: set[str] = set()  # instances that ever renewed their lease

    # --- plumbing ----------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def _new_user(self) -> int:
        async with db.sessionmaker(self.engine)() as session, session.begin():
            user = await users.create_user(session, f"{new_id('m')}@example.com")
            return user.id

    async def _fund(self, user: int, amount: int) -> None:
        """Credit exactly what the next hold needs (a grant, not a top-up: no key to remember)."""
        if amount:
            async with self.engine.begin() as conn:
                await ledger.grant(conn, user, amount)
            assert self.owed[user] == 0  # the racer never owes: the grant goes to its wallet, the hold takes it
            self.platform[FUNDING] -= amount

    def credit(self, user: int, amount: int) -> None:
        """Money for the user's wallet: their debt first."""
        settled = min(amount, self.owed[user])
        self.owed[user] -= settled
        self.available[user] += amount - settled

    def take_back(self, user: int, amount: int) -> None:
        """A reversal: from the wallet as far as it goes, the rest as debt."""
        taken = min(amount, self.available[user])
        self.available[user] -= taken
        self.owed[user] += amount - taken

    async def _platform_balances(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(Account.id, Account.balance).where(Account.id.in_(PLATFORM)))
            return {account: int(value) for account, value in rows.all()}

    def user(self, index: int) -> int:
        return self.users[index]

    def pending(self) -> list[str]:
        return [h for h, model in self.holds.items() if model.status == PENDING]  # creation order

    def resolved(self) -> list[str]:
        return [h for h, model in self.holds.items() if model.status != PENDING]

    def live(self) -> set[str]:
        """The holds of requests still running in the current coordinator."""
        return {h for h in self.pending() if self.holds[h].owner == self.instance}

    def charges(self, plans: list[PayoutArgs], left: int) -> list[ledger.Payout]:
        """What the coordinator would write for these requests: each capped at what the lease has
        left, the provider's share after the fee (none for the platform upstream)."""
        payouts = []
        for plan in plans:
            amount = max(0, min(plan.charge, left))
            provider = self.user(plan.provider) if plan.provider is not None else None
            share = ledger.provider_share(amount, plan.fee_bps) if provider is not None else 0
            payouts.append(ledger.Payout(amount, provider, share, plan.upstream_cost))
        return payouts

    def charged(self, hold_id: str, payouts: list[ledger.Payout]) -> None:
        """Apply a written batch of charges to the model."""
        self.holds[hold_id].charged += sum(p.amount for p in payouts)
        for payout in payouts:
            if payout.provider_user_id is not None:
                self.escrowed[payout.provider_user_id] += payout.provider_share
            self.platform[FEES] += payout.amount - payout.provider_share - payout.upstream_cost
            self.platform[UPSTREAM] += payout.upstream_cost

    def released(self, hold_id: str) -> None:
        model = self.holds[hold_id]
        model.status = RELEASED
        self.credit(model.user, model.amount - model.charged)

    # --- credits in --------------------------------------------------------------------------

    @initialize(first=TOPUPS, second=TOPUPS)
    def opening_topups(self, first: int, second: int) -> None:
        for who, amount in zip(CONSUMERS, (first, second), strict=True):
            self.new_topup(who, amount)

    def new_topup(self, who: int, amount: int) -> None:
        user, key = self.user(who), new_id("topup-")
        if amount <= 0:
            try:
                self.run(ledger.topup(self.engine, key, user, amount))
            except ValueError:
                return
            raise AssertionError("a top-up of nothing was accepted")
        result = self.run(ledger.topup(self.engine, key, user, amount))
        assert (result.user_id, result.amount, result.replayed) == (user, amount, False)
        self.topups[key] = (user, amount, result.tx_id)
        self.credit(user, amount)
        self.platform[FUNDING] -= amount

    @rule(data=st.data(), who=st.sampled_from([*CONSUMERS, PROVIDER]), amount=TOPUPS, reuse=st.booleans())
    def topup(self, data: st.DataObject, who: int, amount: int, reuse: bool) -> None:
        """A top-up, sometimes with a key used before: the same body replays the first result (no
        second credit), any other body (amount or user) is refused."""
        if not (reuse and self.topups):
            self.new_topup(who, amount)
            return
        key = data.draw(st.sampled_from(list(self.topups)), label="key")
        first_user, first_amount, tx_id = self.topups[key]
        user = self.user(who)
        if data.draw(st.booleans(), label="same body"):
            user, amount = first_user, first_amount
        if (user, amount) == (first_user, first_amount):
            result = self.run(ledger.topup(self.engine, key, user, amount))
            assert (result.tx_id, result.user_id, result.amount, result.replayed) == (tx_id, user, amount, True)
            return
        try:
            self.run(ledger.topup(self.engine, key, user, amount))
        except ledger.IdempotencyConflict:
            return
        raise AssertionError(f"key {key} reused for a different top-up was accepted")

    @rule(who=st.sampled_from(CONSUMERS), amount=st.integers(1, 150), tries=st.integers(2, 4))
    def topup_race(self, who: int, amount: int, tries: int) -> None:
        """The same top-up sent several times at once (a client retrying) credits once."""
        user, key = self.user(who), new_id("topup-")

        async def race() -> list[Any]:
            calls = (ledger.topup(self.engine, key, user, amount) for _ in range(tries))
            return await asyncio.gather(*calls, return_exceptions=True)

        results = self.run(race())
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert sorted(r.replayed for r in results) == [False] + [True] * (tries - 1)
        assert len({r.tx_id for r in results}) == 1
        self.topups[key] = (user, amount, results[0].tx_id)
        self.credit(user, amount)
        self.platform[FUNDING] -= amount

    # --- holds -------------------------------------------------------------------------------

    def _hold_amounts(self, user: int) -> st.SearchStrategy[int]:
        wallet = self.available[user]
        return st.one_of(st.integers(0, wallet), st.sampled_from([wallet, wallet + 1]), AMOUNTS)

    @rule(data=st.data(), who=st.sampled_from(CONSUMERS), requests=st.integers(1, 3))
    def hold(self, data: st.DataObject, who: int, requests: int) -> None:
        """A few requests reserve credits; one larger than what is left is refused and changes nothing."""
        user = self.user(who)
        for _ in range(requests):
            hold_id = new_id("req_")
            amount = data.draw(self._hold_amounts(user), label="amount")
            expired = data.draw(st.booleans(), label="expired (TTL 0)")
            key_id = data.draw(st.none() | st.integers(1, 9), label="key id")
            ttl = 0.0 if expired else 600.0
            try:
                self.run(ledger.hold(self.engine, hold_id, user, key_id, amount, self.instance, ttl))
            except ledger.InsufficientCredits as refused:
                assert self.available[user] < amount
                assert (refused.needed, refused.available) == (amount, self.available[user])
                self.refused.append(hold_id)
                continue
            assert self.available[user] >= amount, "a hold larger than the wallet was accepted"
            self.holds[hold_id] = HoldModel(user, amount, self.instance, expired)
            self.available[user] -= amount

    @rule(who=st.sampled_from(CONSUMERS), amounts=st.lists(st.integers(0, 120), min_size=2, max_size=4))
    def hold_race(self, who: int, amounts: list[int]) -> None:
        """Concurrent holds on one wallet never overspend it, and each refusal was justified."""
        user = self.user(who)
        ids = [new_id("req_") for _ in amounts]

        async def race() -> list[Any]:
            calls = (
                ledger.hold(self.engine, h, user, None, a, self.instance, 600.0)
                for h, a in zip(ids, amounts, strict=True)
            )
            return await asyncio.gather(*calls, return_exceptions=True)

        results = self.run(race())
        wallet = self.available[user]
        won = [(h, a) for h, a, r in zip(ids, amounts, results, strict=True) if r is None]
        lost = [(h, a, r) for h, a, r in zip(ids, amounts, results, strict=True) if r is not None]
        assert all(isinstance(r, ledger.InsufficientCredits) for _, _, r in lost), results
        spent = sum(a for _, a in won)
        assert spent <= wallet
        for hold_id, amount, refused in lost:
            assert amount > wallet - spent, f"hold of {amount} refused with {wallet - spent} left"
            assert refused.available < amount
            self.refused.append(hold_id)
        # Which holds won depends on timing: give them back so no later step depends on it.
        for hold_id, _ in won:
            assert self.run(ledger.release(self.engine, hold_id, "failed")) is True
            self.raced.append(hold_id)

    # --- resolving holds ---------------------------------------------------------------------

    @precondition(lambda self: self.pending())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """A lease closes (or a request fails): what it has not charged goes back to the wallet."""
        hold_id = data.draw(st.sampled_from(self.pending()), label="hold")
        assert self.run(ledger.release(self.engine, hold_id, "lease closed")) is True
        self.released(hold_id)

    @precondition(lambda self: self.resolved())
    @rule(data=st.data(), how=RESOLVERS)
    def resolve_again(self, data: st.DataObject, how: str) -> None:
        """A resolved hold stays resolved: releasing it again, or charging it, is a no-op."""
        hold_id = data.draw(st.sampled_from(self.resolved()), label="hold")
        if how == "release":
            assert self.run(ledger.release(self.engine, hold_id, "again")) is False
        else:
            plans = data.draw(
                st.lists(payout_args(self.holds[hold_id].amount), min_size=1, max_size=2), label="payouts"
            )
            payouts = self.charges(plans, 0)
            assert self.run(ledger.charge(self.engine, hold_id, new_id("b"), payouts)) is False

    @rule(data=st.data(), racers=st.lists(RESOLVERS, min_size=1, max_size=3), amount=st.integers(0, 120))
    def resolve_race(self, data: st.DataObject, racers: list[str], amount: int) -> None:
        """Charges and releases of one lease at once (a flush and a shutdown): exactly one release
        wins; a charge is written if it came first, and then counts in full, or not at all.

        Who wins depends on timing, so the hold is the racer's, whose balances no later draw reads."""
        user, hold_id = self.user(RACER), new_id("req_")
        self.run(self._fund(user, amount))
        self.run(ledger.hold(self.engine, hold_id, user, None, amount, self.instance, 600.0))
        self.holds[hold_id] = HoldModel(user, amount, self.instance, expired=False)
        racers = ["release", *racers]
        share = amount // len(racers)  # every charge fits, whatever the order
        plans = [
            data.draw(st.lists(payout_args(share), min_size=1, max_size=2), label="payouts")
            if how == "charge"
            else None
            for how in racers
        ]
        batches = [self.charges(p, share // len(p)) if p else None for p in plans]

        async def race() -> list[Any]:
            calls = [
                ledger.charge(self.engine, hold_id, new_id("b"), b)
                if b
                else ledger.release(self.engine, hold_id, "race")
                for b in batches
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = self.run(race())
        assert not [r for r in results if isinstance(r, BaseException)], results
        releases = [r for r, b in zip(results, batches, strict=True) if b is None]
        assert releases.count(True) == 1 and releases.count(False) == len(releases) - 1, results
        for result, batch in zip(results, batches, strict=True):
            if batch is not None and result:
                self.charged(hold_id, batch)
        self.released(hold_id)

    @precondition(lambda self: len(self.pending()) >= 2)
    @rule(data=st.data())
    def resolve_many_at_once(self, data: st.DataObject) -> None:
        """Different leases charged or released concurrently (shared provider and platform rows) all go through."""
        chosen = data.draw(
            st.lists(st.sampled_from(self.pending()), min_size=2, max_size=4, unique=True), label="holds"
        )
        plans = []
        for hold_id in chosen:
            left = self.holds[hold_id].amount - self.holds[hold_id].charged
            drawn = data.draw(
                st.none() | st.lists(payout_args(left), min_size=1, max_size=3), label="charge or release"
            )
            plans.append((hold_id, self.charges(drawn, left // len(drawn)) if drawn else None))

        async def together() -> list[Any]:
            calls = [
                ledger.charge(self.engine, h, new_id("b"), b) if b else ledger.release(self.engine, h, "lease closed")
                for h, b in plans
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = self.run(together())
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert all(r is True for r in results), results
        for hold_id, batch in plans:
            if batch is None:
                self.released(hold_id)
            else:
                self.charged(hold_id, batch)

    # --- credit leases: holds grown in place and charged in batches ----------------------------

    @precondition(lambda self: self.pending())
    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        """A lease runs short and grows by what the wallet has, or is refused and changes nothing."""
        hold_id = data.draw(st.sampled_from(self.pending()), label="hold")
        model = self.holds[hold_id]
        amount = data.draw(self._hold_amounts(model.user), label="amount")
        try:
            assert self.run(ledger.extend(self.engine, hold_id, model.user, amount)) is True
        except ledger.InsufficientCredits as refused:
            assert (refused.needed, refused.available) == (amount, self.available[model.user])
            assert self.available[model.user] < amount
            return
        assert self.available[model.user] >= amount, "a lease grew beyond the wallet"
        model.amount += amount
        self.available[model.user] -= amount

    @precondition(lambda self: self.pending())
    @rule(data=st.data())
    def charge(self, data: st.DataObject) -> None:
        """A flush writes the finished requests of a lease: all of them if they fit what the lease
        has left, none otherwise."""
        hold_id = data.draw(st.sampled_from(self.pending()), label="hold")
        model = self.holds[hold_id]
        left = model.amount - model.charged
        plans = data.draw(st.lists(payout_args(left), min_size=1, max_size=4), label="payouts")
        payouts = self.charges(plans, left)
        total = sum(p.amount for p in payouts)
        batch = new_id("b")
        written = self.run(ledger.charge(self.engine, hold_id, batch, payouts))
        assert written is (total <= left), f"charging {total} with {left} left"
        if not written:
            return
        if data.draw(st.booleans(), label="retry the batch"):  # as after a commit in doubt
            assert self.run(ledger.charge(self.engine, hold_id, batch, payouts)) is True
        self.charged(hold_id, payouts)

    # --- payments: paid in, refunded, disputed -------------------------------------------------

    @rule(who=st.sampled_from([*CONSUMERS, PROVIDER]), amount=st.integers(1, 200) | BIG)
    def pay_in(self, who: int, amount: int) -> None:
        """A Checkout payment completes."""
        user, payment = self.user(who), payments.new_id()
        self.run(payments.open_payment(self.engine, payment, user, amount, "checkout"))
        self.payments[payment] = PaymentModel(user, events=[])
        self.deliver(payment, "checkout.session.completed", Facts(paid=amount, payment_intent="pi_" + payment))

    @precondition(lambda self: self.payments)
    @rule(data=st.data(), kind=st.sampled_from(["refund", "dispute", "won", "lost", "replay"]))
    def payment_event(self, data: st.DataObject, kind: str) -> None:
        """A refund (a cumulative total, maybe lower than one seen: late), a dispute opened, won or
        lost (maybe after its close: stale), or an event delivered again. After a spend the
        wallet cannot cover it: debt."""
        payment = data.draw(st.sampled_from(list(self.payments)), label="payment")
        model = self.payments[payment]
        assert model.events is not None
        if kind == "replay":
            event_id, event_type, facts = data.draw(st.sampled_from(model.events), label="event")
            assert self.run(payments.apply(self.engine, event_id, event_type, payment, facts)) is None
            return
        amount = data.draw(st.integers(0, model.paid + 3), label="amount")
        facts = {
            "refund": Facts(refunded=amount),
            "dispute": Facts(dispute_stage=DISPUTE_OPEN, disputed=amount),
            "won": Facts(dispute_stage=DISPUTE_CLOSED, disputed=0),
            "lost": Facts(dispute_stage=DISPUTE_CLOSED, disputed=amount),
        }[kind]
        self.deliver(payment, "charge." + kind, facts)

    def deliver(self, payment: str, event_type: str, facts: Facts) -> None:
        model = self.payments[payment]
        assert model.events is not None
        event_id = new_id("evt_")
        applied = self.run(payments.apply(self.engine, event_id, event_type, payment, facts))
        model.events.append((event_id, event_type, facts))
        model.paid = max(model.paid, facts.paid or 0)
        model.refunded = max(model.refunded, facts.refunded or 0)
        if facts.dispute_stage is not None and facts.dispute_stage > model.stage:
            model.stage, model.disputed = facts.dispute_stage, facts.disputed or 0
        worth = max(0, model.paid - model.refunded - model.disputed)
        change, model.credited = worth - model.credited, worth
        assert applied is not None and (applied.change, applied.credited) == (change, worth)
        if change > 0:
            self.credit(model.user, change)
        else:
            self.take_back(model.user, -change)
        self.platform[FUNDING] -= change

    # --- refunds of requests, escrow, payouts --------------------------------------------------

    @rule(
        who=st.sampled_from(CONSUMERS),
        provider=st.sampled_from([PROVIDER, CONSUMERS[1]]),
        amount=st.integers(0, 150),
        data=st.data(),
    )
    def refund_request(self, who: int, provider: int, amount: int, data: st.DataObject) -> None:
        """A request a failed canary discredits: the consumer gets it back (debt first), the
        provider's share comes out of escrow, then matured earnings, the platform covers the rest;
        once per request."""
        user, by = self.user(who), self.user(provider)
        share = data.draw(st.integers(0, amount), label="share")
        request = new_id("req_")
        assert self.run(ledger.refund(self.engine, request, user, by, amount, share)) is True
        assert self.run(ledger.refund(self.engine, request, user, by, amount, share)) is False
        from_escrow = min(share, self.escrowed[by])
        from_matured = min(share - from_escrow, self.matured[by])
        self.escrowed[by] -= from_escrow
        self.matured[by] -= from_matured
        self.platform[FEES] += from_escrow + from_matured - amount
        self.credit(user, amount)

    @rule(old=st.booleans())
    def mature(self, old: bool) -> None:
        """The escrow sweep: with a cutoff in the past (nothing is that old) or just now (all)."""
        cutoff = ledger.now() + (timedelta(days=-7) if old else timedelta(seconds=1))
        moved = self.run(payouts.mature(self.engine, cutoff))
        expected = 0 if old else sum(self.escrowed.values())
        assert moved >= expected  # earlier examples' providers may mature too
        if not old:
            for user in self.users:
                self.matured[user] += self.escrowed[user]
                self.escrowed[user] = 0

    @rule(who=st.sampled_from([PROVIDER, CONSUMERS[1]]), data=st.data(), minimum=st.integers(0, 50))
    def request_payout(self, who: int, data: st.DataObject, minimum: int) -> None:
        user = self.user(who)
        self.run(payouts.connect_account(self.engine, user, f"acct_{user}"))
        amount = data.draw(st.integers(1, self.matured[user] + 3), label="amount")
        payout_id = payouts.new_id()
        try:
            self.run(payouts.request(self.engine, payout_id, user, amount, minimum))
        except payouts.PayoutRefused as refused:
            assert amount < minimum or amount > self.matured[user], refused.code
            return
        assert minimum <= amount <= self.matured[user]
        self.matured[user] -= amount
        self.pending_payouts[user] += amount
        self.payouts[payout_id] = (user, amount, payouts.REQUESTED)

    @precondition(lambda self: self.payouts)
    @rule(data=st.data(), step=PAYOUT_STEPS)
    def payout_step(self, data: st.DataObject, step: str) -> None:
        """An operator or the transfer moves a payout on; a step from the wrong state is refused."""
        payout_id = data.draw(st.sampled_from(list(self.payouts)), label="payout")
        user, amount, status = self.payouts[payout_id]
        moves = {
            "approve": (payouts.REQUESTED, payouts.APPROVED, lambda: payouts.approve(self.engine, payout_id, "ops")),
            "reject": (
                payouts.REQUESTED,
                payouts.REJECTED,
                lambda: payouts.reject(self.engine, payout_id, "ops", "no"),
            ),
            "transferred": (payouts.APPROVED, payouts.PAID, lambda: payouts.transferred(self.engine, payout_id, "tr")),
            "failed": (payouts.APPROVED, payouts.FAILED, lambda: payouts.failed(self.engine, payout_id, "refused")),
            "reversed": (
                payouts.PAID,
                payouts.FAILED,
                lambda: payouts.failed(self.engine, payout_id, "reversed", was=payouts.PAID),
            ),
        }
        before, after, call = moves[step]
        try:
            moved = self.run(call())
        except payouts.PayoutRefused:
            assert status != before
            return
        assert status == before and moved.status == after
        self.payouts[payout_id] = (user, amount, after)
        if after == payouts.PAID:
            self.pending_payouts[user] -= amount
            self.platform[OUT] += amount
        elif before == payouts.PAID:
            self.platform[OUT] -= amount
            self.matured[user] += amount
        elif after in (payouts.REJECTED, payouts.FAILED):
            self.pending_payouts[user] -= amount
            self.matured[user] += amount

    # --- coordinator crashes and the orphan sweep -----------------------------------------------

    @precondition(lambda self: self.live())
    @rule(heartbeat=st.booleans(), restart=st.sampled_from([None, SHORT_LEASE, LONG_LEASE]))
    def crash(self, heartbeat: bool, restart: float | None) -> None:
        """The coordinator dies (maybe just after renewing its lease): its pending holds lose their
        owner. A new process takes over, and maybe sweeps at once."""
        if heartbeat:
            self.run(ledger.renew_instance(self.engine, self.instance, self.started_at))
            self.renewed.add(self.instance)
        self.instance = new_id("crd_")
        self.started_at = datetime.now(UTC)
        if restart is not None:
            self.sweep_orphans(restart)

    @precondition(lambda self: self.pending())
    @rule(lease=st.sampled_from([SHORT_LEASE, LONG_LEASE]))
    def sweep(self, lease: float) -> None:
        self.sweep_orphans(lease)

    def sweep_orphans(self, lease: float) -> None:
        """Renew, then release orphans: holds of instances whose lease ran out (or that never renewed),
        expired holds of other instances, never the holds of this instance's running requests."""
        self.run(ledger.renew_instance(self.engine, self.instance, self.started_at))
        self.renewed.add(self.instance)
        short = lease == SHORT_LEASE
        if short:
            self.run(asyncio.sleep(SHORT_LEASE * 5))  # every instance's lease has run out (ours too)
        orphans = self.run(ledger.orphaned_holds(self.engine, self.instance, self.live(), lease))
        assert len(orphans) == len(set(orphans))
        expected = {
            h
            for h in self.pending()
            if self.holds[h].owner != self.instance
            and (short or self.holds[h].expired or self.holds[h].owner not in self.renewed)
        }
        mine = {h for h in orphans if h in self.holds}
        assert mine == expected, f"orphans {sorted(mine)}, expected {sorted(expected)}"
        for hold_id in orphans:  # holds left pending by earlier examples may be among them
            assert self.run(ledger.release(self.engine, hold_id, "orphaned")) is True
            if hold_id in self.holds:
                self.released(hold_id)
        if short:  # a crashed coordinator's holds are all back in their wallets
            assert not [h for h in self.pending() if self.holds[h].owner != self.instance]

    # --- the books ---------------------------------------------------------------------------

    @invariant()
    def books_agree_with_the_model(self) -> None:
        self.run(self._check_books())

    async def _check_books(self) -> None:
        async with self.engine.connect() as conn:
            for user in self.users:
                held = sum(m.amount - m.charged for m in self.holds.values() if m.user == user and m.status == PENDING)
                expected = ledger.Balances(
                    self.available[user],
                    held,
                    self.matured[user],
                    self.escrowed[user],
                    self.pending_payouts[user],
                    self.owed[user],
                )
                assert await ledger.balances(conn, user) == expected, f"user {user}"
            rows = (
                await conn.execute(
                    select(Hold.id, Hold.user_id, Hold.amount, Hold.owner, Hold.status, Hold.charged).where(
                        Hold.id.in_([*self.holds, *self.refused, *self.raced])
                    )
                )
            ).all()
        stored = {row[0]: tuple(row[1:]) for row in rows}
        for hold_id in self.raced:
            assert stored.pop(hold_id)[3:] == (RELEASED, 0)
        assert stored == {h: (m.user, m.amount, m.owner, m.status, m.charged) for h, m in self.holds.items()}, (
            "holds differ from the model (or a refused hold was stored)"
        )
        platform = await self._platform_balances()
        assert {a: platform[a] - self.platform_start[a] for a in PLATFORM} == self.platform
        assert await ledger_problems(self.engine) == []


@pytest.mark.timeout(600)  # passes in well under a minute; a failure may shrink for up to 5 minutes
def test_billing_state_machine_keeps_the_books(db_url: str) -> None:
    loop = asyncio.new_event_loop()
    engine = db.create_engine(db_url)
    try:
        loop.run_until_complete(db.migrate(engine))
        run_state_machine_as_test(
            lambda: BillingMachine(loop, engine),
            settings=settings(
                # Each run draws new programs: every CI run adds ten more of 50 steps to the ones before.
                max_examples=10,
                stateful_step_count=50,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            ),
        )
    finally:
        loop.run_until_complete(engine.dispose())
        loop.close()
