"""Money in the portal and the operator console, in a real browser (Playwright driving Debian's
Chromium) against a real coordinator and Stripe's stand-in: a developer adds credits with a preset
and a custom amount (the button, the stand-in's Checkout page, its signed webhook, the balance shown
on return) and downloads a statement; a provider connects a payout account and asks for payouts,
which an operator approves (paid) or rejects in the console; the console lists users with their
balances, adjusts credit with a reason, shows agents and their trust, and its ledger check reports
a transaction the test unbalances on purpose."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from scripts import localpool
from shared.money import NANO_PER_USD, format_usd
from tests.e2e.test_pages import PASSWORD, browser, metric, shoot, sign_up  # noqa: F401 (browser: a fixture)
from tests.harness import Pool, with_stripe
from tests.waiting import eventually

SLUG = "smollm2-135m"


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """Stripe's stand-in beside the pool; earnings mature at once and payouts start at $0.01."""
    harness = with_stripe(
        tmp_path_factory.mktemp("payment-pages"),
        payout_hold_days="0",
        escrow_sweep_seconds="0.3",
        payout_minimum_usd="0.01",
        auto_topup_seconds="0.3",
    )
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def test_a_developer_adds_credits_through_checkout(shop: Pool, browser: Browser) -> None:  # noqa: F811
    page = sign_up(browser, shop, "payer@example.com")
    try:
        assert metric(page, "balance") == format_usd(0)
        shoot(page, "portal-add-credits")
        page.get_by_label("Save the card for automatic top-ups").check()
        page.get_by_role("button", name="$10", exact=True).click()
        expect(page.get_by_role("heading", name="Stand-in checkout")).to_be_visible()
        page.get_by_role("button", name="Pay $10.00").click()  # Stripe sends its webhook, then the browser back
        expect(page.get_by_text("Payment received")).to_be_visible()
        assert page.url.endswith("/portal/?topup=paid")
        page.reload()
        assert metric(page, "balance") == format_usd(10 * NANO_PER_USD)
        page.get_by_label("Other amount (USD)").fill("12.34")
        page.get_by_role("button", name="Pay", exact=True).click()
        page.get_by_role("button", name="Pay $12.34").click()
        expect(page.get_by_text("Payment received")).to_be_visible()
        page.reload()
        assert metric(page, "balance") == format_usd(22_340_000_000)
        page.get_by_label("Other amount (USD)").fill("0.5")  # under the minimum: the browser's own check
        page.get_by_label("Other amount (USD)").evaluate("input => input.removeAttribute('min')")
        page.get_by_role("button", name="Pay", exact=True).click()
        expect(page.get_by_text("Choose an amount in whole cents within the limits shown.")).to_be_visible()
        assert metric(page, "balance") == format_usd(22_340_000_000)
        page.get_by_role("link", name="Credit transactions and monthly statements").click()
        expect(page.locator('#transactions tr[data-kind="topup"]')).to_have_count(2)
        with page.expect_download() as download:
            page.get_by_role("button", name="Download statement (CSV)").click()
        lines = Path(download.value.path()).read_text().splitlines()
        assert lines[-1].endswith(",22.34,") and "Credits added" in lines[2], lines
        shoot(page, "portal-credits")
        page.get_by_label("On", exact=True).check()  # the card saved with the first payment
        page.get_by_label("When the balance falls under (USD)").fill("30")
        page.get_by_label("add (USD)").fill("5")
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page.get_by_text("Automatic top-ups are on.")).to_be_visible()

        def topped_up() -> bool:
            page.reload()
            return metric(page, "balance") == format_usd(27_340_000_000)

        eventually(topped_up, timeout=10, interval=0.3)  # $22.34 is under $30: charged $5, once
        expect(page.locator('#transactions tr[data-kind="topup"]')).to_have_count(3)
    finally:
        page.close()


def test_a_provider_connects_a_payout_account_and_is_paid(shop: Pool, browser: Browser) -> None:  # noqa: F811
    page = sign_up(browser, shop, "earner@example.com")
    try:
        page.get_by_role("link", name="Provider", exact=True).click()
        page.get_by_label("Name").fill("gpu")
        page.get_by_role("button", name="Create agent token").click()
        token = page.locator("#secret").inner_text().strip()
        agent = shop.agent(shop.standin(chunks=100, interval_ms=2), [SLUG], token=token, price_in="50", price_out="200")
        try:
            for _ in range(2):
                body = {"model": SLUG, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
                assert shop.post(body).status_code == 200
        finally:
            agent.stop()
        page.goto(f"{shop.url}/portal/provider")
        page.get_by_role("button", name="Connect a payout account").click()  # onboarding, and back
        expect(page.get_by_text("Payout account connected")).to_be_visible()

        def payable() -> bool:
            page.reload()
            return metric(page, "payable") != format_usd(0)

        eventually(payable, timeout=20, interval=0.3)
        for amount in ("0.02", "0.01"):
            page.get_by_label("Amount (USD)").fill(amount)
            page.get_by_role("button", name="Request payout").click()
            expect(page.get_by_text("Payout requested")).to_be_visible()
        rows = page.locator("#payouts tbody tr")
        expect(rows.first).to_contain_text("requested")
        second, first = rows.nth(0).get_attribute("data-payout"), rows.nth(1).get_attribute("data-payout")
        console = operator(browser, shop)
        try:
            console.goto(f"{shop.url}/admin/payouts")
            expect(console.locator(f'#waiting tr[data-payout="{first}"]')).to_contain_text("$0.02")
            console.get_by_role("button", name=f"Approve {first}").click()
            expect(console.get_by_text("Approved and transferred.")).to_be_visible()
            console.get_by_label(f"Reason to reject {second}").fill("duplicate request")
            console.get_by_role("button", name=f"Reject {second}").click()
            expect(console.get_by_text("Rejected: the amount is back")).to_be_visible()
            expect(console.locator(f'#latest tr[data-payout="{first}"]')).to_contain_text("paid")
            expect(console.locator(f'#latest tr[data-payout="{second}"]')).to_contain_text("duplicate request")
            shoot(console, "admin-payouts")
        finally:
            console.close()
        page.reload()
        expect(page.locator(f'#payouts tr[data-payout="{first}"]')).to_contain_text("paid")
        expect(page.locator(f'#payouts tr[data-payout="{second}"]')).to_contain_text("rejected")
        shoot(page, "provider-payouts")
    finally:
        page.close()


def operator(browser: Browser, pool: Pool) -> Page:  # noqa: F811
    """A page signed in as the pool's operator (an account with the admin role)."""
    email = "ops@example.com"
    if (
        httpx.post(f"{pool.url}/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=10).status_code
        != 200
    ):
        sign_up(browser, pool, email).close()
        localpool.admin(pool.env, "set-role", "--email", email, "--role", "admin")
    page = browser.new_page()
    page.goto(f"{pool.url}/portal/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Developer portal")).to_be_visible()
    return page


def test_the_operator_console_shows_users_agents_and_the_books_and_adjusts_credit(shop: Pool, browser: Browser) -> None:  # noqa: F811
    client = "client@example.com"
    shop.sign_up(client, PASSWORD)
    shop.grant(client, "5")
    outsider = sign_up(browser, shop, "outsider@example.com")
    try:
        assert outsider.goto(f"{shop.url}/admin/").status == 404  # not an operator: no console
    finally:
        outsider.close()
    assert httpx.get(f"{shop.url}/admin/", follow_redirects=False, timeout=10).headers["location"] == "/portal/login"
    agent = shop.agent(shop.standin(chunks=3), [SLUG], price_in="0.5", price_out="1")
    console = operator(browser, shop)
    try:
        console.goto(f"{shop.url}/admin/")
        expect(console.get_by_role("heading", name="Operator console")).to_be_visible()
        assert metric(console, "agents") == "1"
        console.get_by_role("link", name="Agents").click()
        expect(console.locator("#agents tbody tr")).to_have_count(1)
        expect(console.locator("#agents tbody tr")).to_contain_text(SLUG)
        console.get_by_role("link", name="Users").click()
        console.get_by_label("Email contains").fill("client@")
        console.get_by_role("button", name="Search").click()
        row = console.locator("#users tbody tr", has_text=client)
        expect(row).to_contain_text(format_usd(5 * NANO_PER_USD))
        row.get_by_label(f"Amount for {client}").fill("-1.50")
        row.get_by_label(f"Reason for {client}").fill("duplicate grant")
        row.get_by_role("button", name=f"Adjust {client}").click()
        expect(console.get_by_text("Credits adjusted.")).to_be_visible()
        console.get_by_label("Email contains").fill("client@")
        console.get_by_role("button", name="Search").click()
        row = console.locator("#users tbody tr", has_text=client)
        expect(row).to_contain_text(format_usd(3_500_000_000))
        row.get_by_label(f"Amount for {client}").fill("-100")
        row.get_by_label(f"Reason for {client}").fill("too much")
        row.get_by_role("button", name=f"Adjust {client}").click()
        expect(console.get_by_text("The wallet holds less than that")).to_be_visible()
        shoot(console, "admin-users")
        login = httpx.post(f"{shop.url}/v1/auth/login", json={"email": client, "password": PASSWORD}, timeout=10)
        statement = httpx.get(
            f"{shop.url}/v1/credits/transactions",
            headers={"authorization": f"Bearer {login.json()['token']}"},
            timeout=10,
        ).json()["data"]
        newest = statement[0]
        assert (newest["kind"], newest["amountNano"]) == ("adjustment", -1_500_000_000)
        assert newest["description"] == "Adjusted by the operator: duplicate grant"

        console.get_by_role("link", name="Ledger health").click()
        expect(console.locator("#ledger-verdict")).to_have_text("The books are sound")
        broken = unbalance(shop)
        console.reload()
        expect(console.locator("#ledger-verdict")).to_contain_text("problem")
        expect(console.locator("#problems")).to_contain_text(f"transaction {broken} sums to 7")
        shoot(console, "admin-ledger")
        rebalance(shop, broken)
        console.reload()
        expect(console.locator("#ledger-verdict")).to_have_text("The books are sound")
    finally:
        console.close()
        agent.stop()


def unbalance(pool: Pool) -> str:
    """Write a transaction whose one entry credits a wallet from nowhere, straight into the database."""
    tx = "tx_broken_on_purpose"
    with sqlite3.connect(pool.db_url.removeprefix("sqlite+aiosqlite:///")) as db:
        user = db.execute("SELECT id FROM users WHERE email = 'client@example.com'").fetchone()[0]
        db.execute(
            "INSERT INTO ledger_transactions (id, kind, ref, created_at) VALUES (?, 'grant', NULL, CURRENT_TIMESTAMP)",
            (tx,),
        )
        db.execute("INSERT INTO ledger_entries (tx_id, account_id, amount) VALUES (?, ?, 7)", (tx, f"wallet:{user}"))
    return tx


def rebalance(pool: Pool, tx: str) -> None:
    """Entries are append-only: a correcting entry puts the books right."""
    with sqlite3.connect(pool.db_url.removeprefix("sqlite+aiosqlite:///")) as db:
        account = db.execute("SELECT account_id FROM ledger_entries WHERE tx_id = ?", (tx,)).fetchone()[0]
        db.execute("INSERT INTO ledger_entries (tx_id, account_id, amount) VALUES (?, ?, -7)", (tx, account))
