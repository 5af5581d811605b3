"""Top-ups and payouts through a real coordinator and Stripe's stand-in on loopback (a real HTTP
server that speaks the endpoints the pool calls and signs its webhooks as Stripe does), on SQLite
and PostgreSQL: a Checkout top-up credited once however often and in whatever order its events
come; forged and stale webhooks refused; a refund or dispute after the credit was spent leaves debt
that blocks requests (402) until a new top-up pays it; payouts through escrow, approval and
transfer, a refused transfer and a reversed one returning the amount to the provider."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import secrets
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from scripts import localpool
from tests.harness import ADMIN_TOKEN, Pool, with_stripe
from tests.ledger_checks import books_of
from tests.waiting import eventually

SLUG = "smollm2-135m"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def paid(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A pool with Stripe's stand-in and one agent of a provider who signed up in the portal (a
    stand-in backend at the highest prices allowed, at a plausible speed, so a few requests earn it
    cents; its session in
    ``extra["provider"]``); earnings mature at once, payouts start at $0.01."""
    settings = {
        "payout_hold_days": "0",
        "escrow_sweep_seconds": "0.5",
        "payout_minimum_usd": "0.01",
        "topup_min_usd": "1",
        "auto_topup_seconds": "0.2",
    }
    workdir = tmp_path_factory.mktemp(f"payments-{request.param}")
    db_url = request.getfixturevalue("own_database") if request.param == "postgresql" else None
    harness = with_stripe(workdir, db_url=db_url, **settings)
    harness.start()
    try:
        provider = User(harness)
        token = httpx.post(
            f"{harness.url}/v1/agent-tokens", json={"displayName": "gpu"}, headers=provider.portal, timeout=10
        )
        assert token.status_code == 201, token.text
        harness.agent(
            harness.standin(chunks=100, interval_ms=2),
            [SLUG],
            token=token.json()["token"],
            price_in="50",
            price_out="200",
        )
        harness.extra["provider"] = provider.portal["authorization"]
        yield harness
    finally:
        harness.stop()


class User:
    """A signed-up user with a portal session and a consumer key."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.email = f"payer-{secrets.token_hex(3)}@example.com"
        session = pool.sign_up(self.email, "correct horse battery staple")
        self.portal = {"authorization": f"Bearer {session['token']}"}
        created = httpx.post(f"{pool.url}/v1/tokens", json={"displayName": "k"}, headers=self.portal, timeout=10)
        assert created.status_code == 201, created.text
        self.key = created.json()["token"]

    def credits(self) -> dict[str, Any]:
        response = httpx.get(f"{self.pool.url}/v1/credits", headers=self.portal, timeout=10)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def checkout(self, usd: object, save: bool = False) -> httpx.Response:
        body = {"amountUsd": usd, "saveCard": save}
        return httpx.post(f"{self.pool.url}/v1/credits/checkout", json=body, headers=self.portal, timeout=30)

    def top_up(self, usd: str, hold: bool = False, save: bool = False) -> dict[str, Any]:
        """Pay a Checkout session at the stand-in; the completed event (sent unless ``hold``)."""
        started = self.checkout(usd, save)
        assert started.status_code == 201, started.text
        session = started.json()["url"].rsplit("/", 1)[-1]
        return control(self.pool, "complete", session=session, hold=hold)

    def chat(self) -> httpx.Response:
        body = {"model": SLUG, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
        return httpx.post(
            f"{self.pool.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {self.key}"},
            timeout=60,
        )


def control(pool: Pool, what: str, **body: object) -> dict[str, Any]:
    response = httpx.post(f"{pool.extra['stripe']}/_control/{what}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def deliver(pool: Pool, *events: str, age: int = 0, secret: str | None = None) -> list[int]:
    body: dict[str, Any] = {"events": list(events), "age": age}
    if secret is not None:
        body["secret"] = secret
    return list(control(pool, "deliver", **body)["statuses"])


def books(pool: Pool) -> list[str]:
    return asyncio.run(books_of(pool.db_url))[1]


def test_a_top_up_is_credited_once_and_forged_or_stale_webhooks_change_nothing(paid: Pool) -> None:
    user = User(paid)
    assert user.checkout("0.5").json()["error"]["param"] == "amountUsd"  # under the minimum
    assert user.checkout("10.001").status_code == 400  # not whole cents
    assert (
        httpx.post(
            f"{paid.url}/v1/credits/checkout",
            json={"amountUsd": 5},
            headers={"authorization": f"Bearer {user.key}"},
            timeout=10,
        ).status_code
        == 401
    )
    event = user.top_up("12.34")
    assert user.credits()["availableUsd"] == pytest.approx(12.34)
    assert deliver(paid, event["id"], event["id"]) == [200, 200]  # Stripe retries; nothing more
    assert user.credits()["availableUsd"] == pytest.approx(12.34)
    # A webhook signed with another secret, or signed too long ago, is refused and changes nothing.
    second = user.top_up("5", hold=True)
    assert deliver(paid, second["id"], secret="whsec_forged") == [400]
    assert deliver(paid, second["id"], age=600) == [400]
    unsigned = httpx.post(f"{paid.url}/v1/payments/stripe/webhook", json=second, timeout=10)
    assert unsigned.status_code == 400 and unsigned.json()["error"]["code"] == "invalid_signature"
    assert user.credits()["availableUsd"] == pytest.approx(12.34)
    assert deliver(paid, second["id"]) == [200]
    assert user.credits()["availableUsd"] == pytest.approx(17.34)
    assert books(paid) == []


def test_refunds_in_any_order_count_once(paid: Pool) -> None:
    user = User(paid)
    completed = user.top_up("20")
    intent = completed["data"]["object"]["payment_intent"]
    first = control(paid, "refund", payment_intent=intent, amount=300, hold=True)  # $3 refunded
    second = control(paid, "refund", payment_intent=intent, amount=500, hold=True)  # $8 in all
    assert deliver(paid, second["id"], first["id"], second["id"]) == [200, 200, 200]
    assert user.credits()["availableUsd"] == pytest.approx(12.0)
    # An inquiry (a "warning" dispute) takes no money: opened and closed, it changes nothing.
    control(paid, "dispute", payment_intent=intent, status="warning_needs_response")
    control(paid, "dispute", payment_intent=intent, status="warning_closed", closed=True)
    assert user.credits()["availableUsd"] == pytest.approx(12.0)
    # A dispute opened before its payment's completion is known still finds the payment.
    other = user.top_up("4", hold=True)
    dispute = control(paid, "dispute", payment_intent=other["data"]["object"]["payment_intent"], hold=True)
    assert deliver(paid, dispute["id"], other["id"]) == [200, 200]
    assert user.credits()["availableUsd"] == pytest.approx(12.0)  # paid and disputed: worth nothing
    assert books(paid) == []


def test_a_dispute_after_the_credit_was_spent_blocks_requests_until_paid(paid: Pool) -> None:
    user = User(paid)
    completed = user.top_up("2")
    assert user.chat().status_code == 200
    spent = eventually(lambda: 2 - user.credits()["balanceUsd"] or None, timeout=10)
    intent = completed["data"]["object"]["payment_intent"]
    control(paid, "dispute", payment_intent=intent)  # the whole $2 is taken back
    owed = eventually(lambda: user.credits()["owedUsd"] or None, timeout=10)
    assert owed == pytest.approx(spent)
    refused = eventually(lambda: (r := user.chat()).status_code == 402 and r, timeout=10)
    error = refused.json()["error"]
    assert error["code"] == "insufficient_credits" and "owes" in error["message"]
    user.top_up("1")  # pays the debt; the rest is credit
    assert user.credits()["owedUsd"] == 0
    assert user.credits()["availableUsd"] == pytest.approx(1 - spent)
    assert user.chat().status_code == 200
    # The dispute is won: the $2 comes back.
    control(paid, "dispute", payment_intent=intent, closed=True, status="won")
    assert eventually(lambda: user.credits()["balanceUsd"] > 2, timeout=10)
    assert books(paid) == []


def test_payouts_go_through_escrow_approval_and_transfer(paid: Pool) -> None:
    consumer = User(paid)
    consumer.top_up("5")
    portal = {"authorization": paid.extra["provider"]}  # its agent serves every request
    url = paid.url
    ask = lambda usd: httpx.post(f"{url}/v1/provider/payouts", json={"amountUsd": usd}, headers=portal, timeout=10)  # noqa: E731
    assert ask("0.01").json()["error"]["code"] == "payout_account_missing"
    link = httpx.post(f"{url}/v1/provider/payout-account", headers=portal, timeout=10)
    assert link.status_code == 200, link.text
    onboarded = httpx.get(link.json()["url"], follow_redirects=False, timeout=10)  # the provider onboards
    assert onboarded.status_code == 303 and onboarded.headers["location"].endswith("?payouts=connected")
    for _ in range(3):
        assert consumer.chat().status_code == 200

    def view() -> dict[str, Any]:
        return dict(httpx.get(f"{url}/v1/provider/payouts", headers=portal, timeout=10).json())

    def unpaid() -> int:  # escrowed and matured: what maturing moves between stays in the sum
        figures = view()
        return int(figures["availableNano"] + figures["escrowedNano"])

    available = eventually(lambda: view()["availableUsd"] >= 0.03 and view()["availableUsd"], timeout=20)
    assert view()["accountConnected"] is True
    assert ask(f"{available + 1:.2f}").json()["error"]["code"] == "insufficient_earnings"
    requested = ask("0.02")
    assert requested.status_code == 201 and requested.json()["status"] == "requested"
    payout = requested.json()["id"]
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.post(f"{url}/v1/admin/payouts/{payout}/approve", headers=portal, timeout=10).status_code == 401
    waiting = httpx.get(f"{url}/v1/admin/payouts", params={"status": "requested"}, headers=admin, timeout=10).json()
    assert payout in [p["id"] for p in waiting]
    approved = httpx.post(f"{url}/v1/admin/payouts/{payout}/approve", headers=admin, timeout=30)
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "paid" and approved.json()["transferId"].startswith("tr_")
    again = httpx.post(f"{url}/v1/admin/payouts/{payout}/approve", headers=admin, timeout=30)
    assert again.status_code == 409 and again.json()["error"]["code"] == "payout_state"
    transfers = httpx.get(f"{paid.extra['stripe']}/_control/transfers", timeout=10).json()["transfers"]
    assert [t["amount"] for t in transfers if t["metadata"]["pool_payout"] == payout] == [2]  # cents, once
    # The transfer is reversed at Stripe: the amount is the provider's again.
    before = unpaid()
    transfer = approved.json()["transferId"]
    control(paid, "reverse", transfer=transfer)
    assert eventually(lambda: unpaid() == before + 20_000_000, timeout=10)
    # A transfer Stripe refuses: the payout fails and the amount returns at once.
    account = next(iter(httpx.get(f"{paid.extra['stripe']}/_control/transfers", timeout=10).json()["accounts"]))
    control(paid, "fail-transfers", account=account)
    failing = ask("0.01").json()["id"]
    failed = httpx.post(f"{url}/v1/admin/payouts/{failing}/approve", headers=admin, timeout=30).json()
    assert failed["status"] == "failed" and failed["failure"]
    assert unpaid() == before + 20_000_000
    rejected = ask("0.01").json()["id"]
    said = httpx.post(
        f"{url}/v1/admin/payouts/{rejected}/reject", json={"reason": "check your details"}, headers=admin, timeout=10
    )
    assert said.json()["status"] == "rejected"
    assert [p["status"] for p in view()["data"]][:3] == ["rejected", "failed", "failed"]
    assert books(paid) == []


def test_transactions_page_through_the_ledger_and_the_statement_balances(paid: Pool) -> None:
    user = User(paid)
    completed = user.top_up("20")
    for _ in range(2):
        assert user.chat().status_code == 200
    control(paid, "refund", payment_intent=completed["data"]["object"]["payment_intent"], amount=300)
    balance = eventually(lambda: (c := user.credits())["heldNano"] == 0 and c["balanceNano"], timeout=10)
    url = f"{paid.url}/v1/credits/transactions"
    whole = httpx.get(url, headers=user.portal, timeout=10).json()
    by_kind = {line["kind"]: line["amountNano"] for line in whole["data"]}
    assert len(whole["data"]) == 3 and whole["data"][-1]["kind"] == "topup", whole  # today's spend: one line
    assert [line["at"] for line in whole["data"]] == sorted((line["at"] for line in whole["data"]), reverse=True)
    assert (by_kind["topup"], by_kind["reversal"]) == (20 * 10**9, -3 * 10**9) and by_kind["spend"] < 0
    assert whole["nextCursor"] is None
    assert sum(line["amountNano"] for line in whole["data"]) == balance
    paged, cursor = [], None
    while True:  # a page at a time, by the cursor
        params: dict[str, Any] = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(url, params=params, headers={"authorization": f"Bearer {user.key}"}, timeout=10).json()
        paged += page["data"]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert [line["id"] for line in paged] == [line["id"] for line in whole["data"]]
    bad = httpx.get(url, params={"cursor": "bm90IG91cnM"}, headers=user.portal, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"
    stranger = User(paid)
    assert httpx.get(url, headers=stranger.portal, timeout=10).json()["data"] == []

    month = whole["data"][0]["at"][:7]
    csv_reply = httpx.get(f"{paid.url}/v1/credits/statement", params={"month": month}, headers=user.portal, timeout=10)
    assert csv_reply.status_code == 200 and csv_reply.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(csv_reply.text)))
    assert rows[0]["kind"] == "opening" and rows[0]["balance_usd"] == "0"
    assert [row["kind"] for row in rows[1:-1]] == [line["kind"] for line in reversed(whole["data"])]  # oldest first
    assert rows[-1]["kind"] == "closing" and Decimal(rows[-1]["balance_usd"]) * 10**9 == balance
    assert rows[-2]["balance_usd"] == rows[-1]["balance_usd"]
    before = httpx.get(f"{paid.url}/v1/credits/statement", params={"month": "2020-01"}, headers=user.portal, timeout=10)
    assert [row["kind"] for row in csv.DictReader(io.StringIO(before.text))] == ["opening", "closing"]
    wrong = httpx.get(f"{paid.url}/v1/credits/statement", params={"month": "2026-13"}, headers=user.portal, timeout=10)
    assert wrong.status_code == 400
    assert books(paid) == []


def page_client(pool: Pool, email: str) -> tuple[httpx.Client, str]:
    """A browser-like client signed in to the pages as ``email`` (a new account), and a form token
    of its session."""
    client = httpx.Client(base_url=pool.url, timeout=10)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/portal/signup").text)
    assert token is not None
    done = client.post("/portal/signup", data={"csrf": token[1], "email": email, "password": "correct horse battery"})
    assert done.status_code == 303, done.text
    signed = re.search(r'name="csrf" value="([^"]+)"', client.get("/portal").text)
    assert signed is not None
    return client, signed[1]


def test_only_an_operator_can_adjust_credit_and_only_with_the_consoles_form(paid: Pool) -> None:
    target = User(paid)
    paid.grant(target.email, "5")
    target_id = int(asyncio.run(user_ids(paid.db_url, target.email)))
    form = {"amount": "-5", "reason": "taken"}
    outsider, outsider_csrf = page_client(paid, f"outsider-{secrets.token_hex(3)}@example.com")
    try:
        refused = outsider.post(f"/admin/users/{target_id}/credits", data={**form, "csrf": outsider_csrf})
        assert refused.status_code == 404
        assert outsider.get("/admin/ledger").status_code == 404
    finally:
        outsider.close()
    email = f"ops-{secrets.token_hex(3)}@example.com"
    ops, ops_csrf = page_client(paid, email)
    localpool.admin(paid.env, "set-role", "--email", email, "--role", "admin")
    try:
        assert ops.get("/admin/ledger").status_code == 200
        forged = ops.post(f"/admin/users/{target_id}/credits", data=form)  # no form token: a cross-site post
        assert forged.status_code == 303 and forged.headers["location"].endswith("done=expired")
        wrong = ops.post(f"/admin/users/{target_id}/credits", data={**form, "amount": "lots", "csrf": ops_csrf})
        assert wrong.headers["location"].endswith("done=amount")
        assert target.credits()["balanceNano"] == 5 * 10**9
        done = ops.post(f"/admin/users/{target_id}/credits", data={**form, "csrf": ops_csrf})
        assert done.headers["location"].endswith("done=adjusted")
    finally:
        ops.close()
    assert target.credits()["balanceNano"] == 0
    assert books(paid) == []


async def user_ids(url: str, email: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(text("SELECT id FROM users WHERE email = :e"), {"e": email}))
    finally:
        await engine.dispose()


def test_an_automatic_top_up_charges_once_per_crossing_across_two_coordinators(paid: Pool) -> None:
    """A second coordinator on the same database sweeps too (both every 0.2 s): each time the
    balance falls under the threshold the saved card is charged once; while the top-up leaves it
    under, nothing more; back over, the next crossing charges again; a declined card turns it off."""
    other_port = localpool.free_port()
    other = localpool.start_coordinator(other_port, paid.env, paid.dir, name=f"second-{other_port}")
    try:
        user = User(paid)
        url = f"{paid.url}/v1/credits/auto-topup"
        wanted = {"enabled": True, "thresholdUsd": "20", "amountUsd": "1"}
        refused = httpx.put(url, json=wanted, headers=user.portal, timeout=10)
        assert refused.status_code == 409  # no card saved yet
        first = user.top_up("6", save=True)
        assert httpx.get(url, headers=user.portal, timeout=10).json()["cardSaved"] is True
        customer = first["data"]["object"]["customer"]

        def charges() -> list[dict[str, Any]]:
            intents = httpx.get(f"{paid.extra['stripe']}/_control/intents", timeout=10).json()["intents"]
            return [i for i in intents if i["customer"] == customer and "pool_auto_user" in i["metadata"]]

        on = httpx.put(url, json=wanted, headers=user.portal, timeout=10)
        assert on.status_code == 200 and on.json()["enabled"] is True
        eventually(lambda: user.credits()["balanceNano"] == 7 * 10**9, timeout=10)  # $6 + one automatic $1
        time.sleep(1.0)  # five sweeps of each coordinator: still under $20, and charged once
        assert len(charges()) == 1 and user.credits()["balanceNano"] == 7 * 10**9
        # Back over a lower threshold (re-armed), then under it again: a second charge, one only.
        httpx.put(url, json={**wanted, "thresholdUsd": "5"}, headers=user.portal, timeout=10)
        time.sleep(0.5)
        control(paid, "dispute", payment_intent=first["data"]["object"]["payment_intent"])  # $6 taken back: $1 left
        eventually(lambda: user.credits()["balanceNano"] == 2 * 10**9, timeout=10)
        time.sleep(1.0)
        assert len(charges()) == 2
        # A declined card: automatic top-ups turn off, and say why.
        control(paid, "decline", customer=customer)
        user.top_up("5")  # $7: over the threshold, re-armed
        time.sleep(0.5)
        control(paid, "dispute", payment_intent=user_last_intent(paid, user))  # under again
        state = eventually(lambda: (s := httpx.get(url, headers=user.portal, timeout=10).json())["lastError"] and s)
        assert state["enabled"] is False and "declined" in state["lastError"]
        assert len(charges()) == 3
        time.sleep(0.6)
        assert len(charges()) == 3  # off: no retry of a declined card
        assert books(paid) == []
    finally:
        other.stop()


def user_last_intent(pool: Pool, user: User) -> str:
    """The payment intent of the user's latest Checkout payment."""
    sessions = httpx.get(f"{pool.extra['stripe']}/_control/sessions", timeout=10).json()["sessions"]
    mine = [s for s in sessions if s["customer_email"] == user.email and s["payment_intent"]]
    return str(mine[-1]["payment_intent"])
