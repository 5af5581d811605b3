"""The status page and the developer portal in a real browser: Playwright driving Debian's Chromium
against a real coordinator, agent and stand-in backend. Screenshots of every page, at desktop and
phone widths, go to ``tests/screenshots/`` (ignored by git)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.harness import Pool
from tests.waiting import eventually

CHROMIUM = os.environ.get("POOL_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).parents[1] / "screenshots"
WIDTHS = {"desktop": (1280, 800), "phone": (390, 844)}
MSG = [{"role": "user", "content": "Say hi."}]
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is required at {CHROMIUM} (make test installs Debian's chromium there)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A pool with one agent for the whole module (named apart from ``pool``, whose agents the
    conftest stops after every test)."""
    harness = Pool(tmp_path_factory.mktemp("pages"), status_flush_seconds="0.3", public_cache_seconds="0.5")
    harness.start()
    try:
        harness.agent(harness.standin(chunks=3), ["smollm2-135m"], price_in="0.5", price_out="1.5")
        yield harness
    finally:
        harness.stop()


def shoot(page: Page, name: str) -> None:
    """Screenshots at both widths; at each, the page must not scroll sideways."""
    SHOTS.mkdir(exist_ok=True)
    for label, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} overflows sideways by {overflow}px at {label} width"
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size({"width": WIDTHS["desktop"][0], "height": WIDTHS["desktop"][1]})


def metric(page: Page, name: str) -> str:
    return page.locator(f'[data-metric="{name}"]').inner_text().strip()


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} ms"


def pct(value: float) -> str:
    return f"{value * 100:.1f} %"


def requests_last_hour(pool: Pool) -> int:
    body = httpx.get(f"{pool.url}/v1/pool/status", params={"history": "1h"}, timeout=10).json()
    return sum(point["requests"] for point in body["history"]["points"])


def test_status_page_shows_the_numbers_of_the_api_and_updates_live(site: Pool, browser: Browser) -> None:
    pool = site
    for _ in range(2):
        assert pool.post({"model": "smollm2-135m", "messages": MSG}).status_code == 200
    eventually(lambda: requests_last_hour(pool) >= 2, timeout=10)

    first_paint = httpx.get(f"{pool.url}/", follow_redirects=True, timeout=10)  # no JavaScript at all
    assert first_paint.url.path == "/status" and first_paint.status_code == 200
    assert "script-src 'self'" in first_paint.headers["content-security-policy"]
    assert first_paint.headers["x-content-type-options"] == "nosniff"

    page = browser.new_page()
    page.goto(f"{pool.url}/status")
    api = pool.status()
    assert metric(page, "activeProviders") == str(api["activeProviders"]) == "1"
    assert metric(page, "modelsAvailable") == str(api["modelsAvailable"])
    assert metric(page, "avgLatencyP95Ms") == ms(api["avgLatencyP95Ms"])  # type: ignore[arg-type]
    assert metric(page, "fallbackRate") == pct(api["fallbackRate"])  # type: ignore[arg-type]
    hour = requests_last_hour(pool)
    assert metric(page, "requestsLastHour") == str(hour)
    assert f'data-metric="requestsLastHour">{hour}<' in first_paint.text  # the same numbers without script
    listed = {m["id"]: m for m in httpx.get(f"{pool.url}/v1/models", timeout=10).json()["data"]}["smollm2-135m"]
    row = page.locator('tr[data-model="smollm2-135m"]').inner_text()
    assert listed["minBlendedPricePer1mTokensUsd"] == 0.75  # (3 * 0.5 + 1.5) / 4, the figure the page shows
    assert "SmolLM2 135M Instruct" in row and "$0.75" in row
    assert f"\t{listed['avgTrustScore']:.0f}\t" in row
    assert page.locator("figure.chart").count() == 4
    for caption in ("Active providers", "Requests per minute", "p95 latency (ms)", "Fallback rate (%)"):
        expect(page.locator("figcaption", has_text=caption)).to_be_visible()
    assert page.locator("figure.chart :is(polyline, circle)").count() >= 3  # providers, requests and p95 have points

    assert pool.post({"model": "smollm2-135m", "messages": MSG}).status_code == 200
    expect(page.locator('[data-metric="requestsLastHour"]')).to_have_text(str(hour + 1), timeout=15_000)  # no reload
    shoot(page, "status")
    page.close()


def sign_up(browser: Browser, pool: Pool, email: str) -> Page:
    page = browser.new_page()
    page.goto(f"{pool.url}/portal")
    assert page.url.endswith("/portal/login")  # not signed in: to the login page
    page.get_by_role("link", name="Create an account").click()
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="Developer portal")).to_be_visible()
    return page


def create(page: Page, button: str, name: str) -> str:
    page.get_by_label("Name").fill(name)
    page.get_by_role("button", name=button).click()
    expect(page.get_by_text("you will not see it again")).to_be_visible()
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    return page.locator("#secret").inner_text().strip()


def test_a_developer_signs_up_creates_a_key_uses_it_sees_it_and_revokes_it(site: Pool, browser: Browser) -> None:
    pool = site
    email = "dev@example.com"
    page = sign_up(browser, pool, email)
    shoot(page, "portal-empty")
    page.get_by_role("button", name=f"Log out {email}").click()
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong email or password.")
    shoot(page, "login")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_text(f"Signed in as {email}")).to_be_visible()

    key = create(page, "Create key", "laptop <b>one</b>")
    assert re.fullmatch(r"pool_live_\w+", key)
    shoot(page, "key-created")
    page.get_by_role("link", name="Done").click()
    row = page.locator("#keys tbody tr", has_text="laptop <b>one</b>")  # printed as text, not markup
    expect(row).to_have_count(1)
    assert page.locator("#keys b").count() == 0

    pool.grant(email, "5")
    client = openai.OpenAI(base_url=f"{pool.url}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="smollm2-135m", messages=MSG)  # type: ignore[arg-type]
    request_id = (reply.model_extra or {})["x_pool"]["request_id"]
    cost = (reply.model_extra or {})["x_pool"]["cost_usd"]

    page.reload()
    recent = page.locator(f'#recent tr[data-request="{request_id}"]')
    expect(recent).to_contain_text("smollm2-135m")
    expect(recent).to_contain_text("200")
    expect(page.locator("#usage tbody tr", has_text="smollm2-135m")).to_contain_text(f"${cost:.6f}")
    expect(page.locator("#usage-by-kind tbody tr", has_text="chat")).to_contain_text(f"${cost:.6f}")  # spend by API
    expect(page.locator('[data-metric="balance"]')).to_have_text(f"${5 - cost:,.4f}")
    bars = page.locator("figure.chart rect.bar")  # one bar: today's, for the one model used
    assert bars.count() == 1 and ", smollm2-135m: $" in (bars.first.locator("title").text_content() or "")
    assert pool.url in page.locator("pre").first.inner_text()  # the quick start names this pool
    shoot(page, "portal")

    page.locator("#keys tbody tr", has_text="laptop").get_by_role("link", name="Revoke").click()
    expect(page.get_by_role("heading", name="Revoke this API key?")).to_be_visible()
    shoot(page, "revoke")
    page.get_by_role("button", name="Revoke API key").click()
    expect(page.get_by_role("status")).to_contain_text("Revoked")
    expect(page.locator("#keys tbody")).not_to_contain_text("laptop")

    def refused() -> bool:
        try:
            client.chat.completions.create(model="smollm2-135m", messages=MSG)  # type: ignore[arg-type]
        except openai.AuthenticationError:
            return True
        return False

    eventually(refused, timeout=5)
    page.close()


def test_a_developer_sets_a_keys_policy_and_audits_its_requests(site: Pool, browser: Browser) -> None:
    pool = site
    email = "governed@example.com"
    page = sign_up(browser, pool, email)
    key = create(page, "Create key", "checkout service")
    page.get_by_role("link", name="Done").click()
    page.locator("#keys tbody tr", has_text="checkout service").get_by_role("link", name="Policy").click()
    expect(page.get_by_role("heading", name="Policy of “checkout service”")).to_be_visible()
    page.get_by_label("Per UTC day").fill("2000000")  # over the most a cap may be: the form says why
    page.get_by_role("button", name="Save policy").click()
    expect(page.get_by_role("alert")).to_contain_text("spendCap.day")
    page.get_by_label("Allowed models").fill("smollm2")
    page.get_by_label("Per UTC day").fill("2")
    page.get_by_label("an e-mail address").select_option("redact")
    page.get_by_label("an API key, token, private key or password").select_option("block")
    page.get_by_label("Project").fill("checkout")
    shoot(page, "key-policy")
    page.get_by_role("button", name="Save policy").click()
    expect(page.get_by_role("status")).to_contain_text("Policy saved")

    pool.grant(email, "5")
    client = openai.OpenAI(base_url=f"{pool.url}/v1", api_key=key, max_retries=0)
    mail = [{"role": "user", "content": "Write to ann@example.org"}]
    reply = client.chat.completions.create(model="smollm2-135m", messages=mail)  # type: ignore[arg-type]
    served = (reply.model_extra or {})["x_pool"]["request_id"]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "key AKIAIOSFODNN7EXAMPLE"}],  # type: ignore[list-item]
        )
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gemma-3-270m", messages=MSG)  # type: ignore[arg-type]

    page.get_by_role("link", name="All requests, with filters and CSV").click()
    rows = page.locator("#requests tbody tr[data-request]")
    expect(rows).to_have_count(3)
    expect(page.locator(f'#requests tr[data-request="{served}"]')).to_contain_text(
        "email \u00d71"
    )  # the multiplication sign
    expect(page.locator("#requests tbody")).to_contain_text("policy_blocked")
    page.get_by_label("Status").fill("200")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("checkout")
    shoot(page, "requests")
    csv_text = page.request.get(f"{pool.url}/portal/requests.csv?status=200").text()
    assert served in csv_text and "ann@example.org" not in csv_text and "email:1" in csv_text
    page.goto(f"{pool.url}/portal/keys/{int(1e9)}/policy")  # not a key of theirs
    expect(page.get_by_role("heading")).not_to_contain_text("Policy of")
    page.close()


def test_a_provider_sees_its_agent_and_what_it_earned(site: Pool, browser: Browser) -> None:
    pool = site
    email = "gpu@example.com"
    page = sign_up(browser, pool, email)
    page.get_by_role("link", name="Provider", exact=True).click()
    shoot(page, "provider-empty")
    token = create(page, "Create agent token", "gpu-box")
    assert re.fullmatch(r"pool_agent_\w+", token)
    agent = pool.agent(pool.standin(chunks=5), ["smollm2-135m"], token=token, price_in="0.1", price_out="0.2")
    try:
        page.goto(f"{pool.url}/portal/provider")
        row = page.locator("#agents tbody tr", has_text="smollm2-135m")
        expect(row).to_have_count(1)
        agent_id = row.get_attribute("data-agent")
        body = {"model": "smollm2-135m", "messages": MSG, "provider": {"only": [agent_id]}}
        served = pool.post(body)
        assert served.status_code == 200 and served.json()["x_pool"]["agent"] == agent_id
        earned = served.json()["x_pool"]["cost_usd"] * 0.9  # the provider's share after the 10 % fee
        page.reload()
        expect(page.locator('[data-metric="connected"]')).to_have_text("1")
        expect(page.locator("#earnings tbody tr", has_text="smollm2-135m")).to_contain_text("1")
        assert page.locator('[data-metric="earnings"]').inner_text() == f"${earned:.6f}"
        expect(page.locator("#evidence tbody")).to_contain_text("completed")
        expect(page.locator("#tokens tbody tr", has_text="gpu-box")).to_contain_text("gets traffic")
        shoot(page, "provider")
    finally:
        agent.stop()
        page.close()


def test_a_provider_names_itself_and_the_price_board_shows_it(site: Pool, browser: Browser) -> None:
    pool = site
    page = sign_up(browser, pool, "board@example.com")
    page.get_by_role("link", name="Provider", exact=True).click()
    token = create(page, "Create agent token", "board-box")
    agent = pool.agent(pool.standin(chunks=3), ["smollm2-135m"], token=token, price_in="0.1", price_out="0.2")
    try:
        page.goto(f"{pool.url}/portal/provider")
        page.get_by_label("Slug").fill("lisbon-gpus")
        page.get_by_label("Shown as").fill("Lisbon GPUs")
        page.get_by_label("Website").fill("https://lisbon.example")
        page.get_by_label("Description").fill("Two <b>4090s</b> by the river.")
        page.get_by_role("button", name="Save profile").click()
        expect(page.get_by_text("Profile saved")).to_be_visible()
        page.get_by_label("Slug").fill("platform")  # refused, saying why, and nothing changes
        page.get_by_role("button", name="Save profile").click()
        expect(page.get_by_role("alert")).to_contain_text("reserved")

        page.goto(f"{pool.url}/status")
        row = page.locator('tr[data-provider="lisbon-gpus"]')
        expect(row).to_contain_text("Lisbon GPUs")
        expect(row).to_contain_text("live")
        row.get_by_role("link", name="Lisbon GPUs").click()
        expect(page.get_by_role("heading", name="Lisbon GPUs")).to_be_visible()
        expect(page.locator('[data-metric="status"]')).to_have_text("live")
        expect(page.get_by_text("Two <b>4090s</b> by the river.")).to_be_visible()  # text, never markup
        link = page.get_by_role("link", name="https://lisbon.example")
        assert "nofollow" in (link.get_attribute("rel") or "")
        offer = page.locator('tr[data-offer="smollm2-135m"]')
        expect(offer).to_contain_text("$0.10")
        expect(offer).to_contain_text("$0.125")  # blended: (3 * 0.1 + 0.2) / 4
        shoot(page, "provider-public")

        offer.get_by_role("link", name="smollm2-135m").click()
        expect(page.get_by_role("heading", name="SmolLM2 135M Instruct")).to_be_visible()
        expect(page.locator("figcaption", has_text="Lowest blended price")).to_be_visible()
        assert page.locator("figure.chart :is(polyline, circle)").count() >= 1  # offered this hour: a point
        expect(page.locator('tr[data-offer="lisbon-gpus"]')).to_contain_text("$0.125")
        expect(page.locator('[data-metric="minBlended"]')).to_have_text("$0.125")
        shoot(page, "model")
    finally:
        agent.stop()
        page.close()


def test_one_user_cannot_see_or_touch_another_users_keys_usage_or_agents(site: Pool, browser: Browser) -> None:
    pool = site
    owner = sign_up(browser, pool, "owner@example.com")
    key = create(owner, "Create key", "owner-key")
    owner.get_by_role("link", name="Done").click()
    key_id = owner.locator("#keys tbody tr", has_text="owner-key").get_attribute("data-key")
    pool.grant("owner@example.com", "1")
    assert pool.post({"model": "smollm2-135m", "messages": MSG}, key=key).status_code == 200
    owner.get_by_role("link", name="Provider", exact=True).click()
    create(owner, "Create agent token", "owner-gpu")

    context = browser.new_context()  # another browser profile: other cookies
    other = context.new_page()
    other.goto(f"{pool.url}/portal/signup")
    other.get_by_label("Email").fill("other@example.com")
    other.get_by_label("Password").fill(PASSWORD)
    other.get_by_role("button", name="Sign up").click()
    expect(other.get_by_text("No keys yet")).to_be_visible()
    expect(other.get_by_text("No requests yet")).to_be_visible()
    assert "owner" not in other.content()
    other.goto(f"{pool.url}/portal/provider")
    expect(other.get_by_text("No agent tokens yet")).to_be_visible()
    assert "owner" not in other.content()
    other.goto(f"{pool.url}/portal/keys/{key_id}/revoke")  # someone else's key, by its id
    expect(other.get_by_role("heading", name="No such API key")).to_be_visible()
    csrf = other.locator('input[name="csrf"]').first.get_attribute("value")
    response = other.request.post(f"{pool.url}/portal/keys/{key_id}/revoke", form={"csrf": csrf or ""})
    assert response.status == 404
    assert pool.post({"model": "smollm2-135m", "messages": MSG}, key=key).status_code == 200  # still works

    # a form posted from another site carries no matching token: refused, nothing changes
    forged = other.request.post(f"{pool.url}/portal/keys", form={"csrf": "x" * 32, "name": "forged"})
    assert forged.url.endswith("/portal?done=expired")
    other.goto(f"{pool.url}/portal")
    expect(other.get_by_text("No keys yet")).to_be_visible()
    context.close()
    owner.close()


@pytest.fixture(scope="session", autouse=True)
def _fresh_screenshots() -> None:
    shutil.rmtree(SHOTS, ignore_errors=True)
