"""Money in the portal, in a real browser (Playwright driving Debian's Chromium) against a real
coordinator and Stripe's stand-in: a developer adds credits with a preset and a custom amount (the
button, the stand-in's Checkout page, its signed webhook, the balance shown on return); a provider
connects a payout account, asks for a payout and sees it paid once an operator approves it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from shared.money import NANO_PER_USD, format_usd
from tests.e2e.test_pages import browser, metric, shoot, sign_up  # noqa: F401 (browser: a fixture)
from tests.harness import ADMIN_TOKEN, Pool, with_stripe
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
        page.get_by_label("Amount (USD)").fill("0.02")
        page.get_by_role("button", name="Request payout").click()
        expect(page.get_by_text("Payout requested")).to_be_visible()
        row = page.locator("#payouts tbody tr").first
        expect(row).to_contain_text("requested")
        payout = row.get_attribute("data-payout")
        approved = httpx.post(
            f"{shop.url}/v1/admin/payouts/{payout}/approve",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )
        assert approved.status_code == 200 and approved.json()["status"] == "paid", approved.text
        page.reload()
        expect(page.locator("#payouts tbody tr").first).to_contain_text("paid")
        shoot(page, "provider-payouts")
    finally:
        page.close()
