"""Accounts and sessions against hostile clients, through real coordinator processes: signups limited
per address before any hashing and hashes bounded process-wide; signup that never tells whether an
email has an account; accounts that wait for an operator's approval; logout that revokes a session
on every process; portal forms whose tokens an attacker cannot plant.

Clients pick their source address in 127.0.0.0/8, so each test is "another address" to the pool."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from scripts import localpool
from tests.harness import Pool

PASSWORD = "correct horse battery"
SIGNUPS_PER_HOUR = 3
MIB = 1024 * 1024


def bare_pool(workdir: Path, db_url: str | None = None, **settings: str) -> Pool:
    """A coordinator only: its users sign up through the API."""
    harness = Pool(workdir, db_url=db_url, credits_usd="", **settings)
    harness.coordinator = localpool.start_coordinator(harness.port, harness.env, harness.dir)
    return harness


def email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


def client(pool: Pool, source: str) -> httpx.Client:
    """An HTTP client whose requests come from ``source`` (an address in 127.0.0.0/8)."""
    return httpx.Client(base_url=pool.url, transport=httpx.HTTPTransport(local_address=source), timeout=60)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}, body
    assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


def cpu_seconds(pool: Pool) -> float:
    """CPU time the coordinator process has used (all its threads), from /proc."""
    assert pool.coordinator is not None
    fields = Path(f"/proc/{pool.coordinator.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_memory(pool: Pool) -> int:
    """The coordinator's peak resident memory (VmHWM), in bytes."""
    assert pool.coordinator is not None
    status = Path(f"/proc/{pool.coordinator.popen.pid}/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert found is not None
    return int(found[1]) * 1024


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    harness = bare_pool(
        tmp_path_factory.mktemp("accounts"), signups_per_hour=str(SIGNUPS_PER_HOUR), auth_failures_per_minute="1000"
    )
    try:
        yield harness
    finally:
        harness.stop()


# --- signup costs the attacker, not the pool -----------------------------------------------------


def test_signups_are_limited_per_address_before_anything_is_hashed(accounts: Pool) -> None:
    with client(accounts, "127.0.0.2") as one:
        started = cpu_seconds(accounts)
        assert one.post("/v1/auth/signup", json={"email": email("cost"), "password": PASSWORD}).status_code == 202
        per_signup = cpu_seconds(accounts) - started  # one argon2 hash and a few queries
    assert per_signup >= 0.05, per_signup

    with client(accounts, "127.0.0.3") as flooder, ThreadPoolExecutor(8) as threads:
        started = cpu_seconds(accounts)
        replies = list(
            threads.map(
                lambda n: flooder.post("/v1/auth/signup", json={"email": email(f"flood{n}"), "password": PASSWORD}),
                range(40),
            )
        )
        used = cpu_seconds(accounts) - started
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [202] * SIGNUPS_PER_HOUR + [429] * (40 - SIGNUPS_PER_HOUR), statuses
    for refused in (reply for reply in replies if reply.status_code == 429):
        assert "signups" in error_of(refused, 429, "rate_limit_exceeded")["message"]
        wait = int(refused.headers["retry-after"])
        assert 0 < wait <= 3600 // SIGNUPS_PER_HOUR, wait
    # only the admitted signups hashed: the 37 refusals together cost less than two hashes
    assert used < per_signup * (SIGNUPS_PER_HOUR + 2), (used, per_signup)
    # another address is not affected
    with client(accounts, "127.0.0.4") as other:
        assert other.post("/v1/auth/signup", json={"email": email("other"), "password": PASSWORD}).status_code == 202


def test_concurrent_hashes_are_bounded_process_wide(accounts: Pool) -> None:
    """A flood of signups from many addresses (each within its limit) queues for the hashing threads
    instead of running every 64 MiB hash at once."""
    with client(accounts, "127.0.1.250") as warm:
        assert warm.post("/v1/auth/signup", json={"email": email("warm"), "password": PASSWORD}).status_code == 202
    before = peak_memory(accounts)

    def sign_up(n: int) -> int:
        with client(accounts, f"127.0.1.{n + 1}") as one:
            return one.post("/v1/auth/signup", json={"email": email(f"crowd{n}"), "password": PASSWORD}).status_code

    with ThreadPoolExecutor(24) as threads:
        statuses = list(threads.map(sign_up, range(24)))
    assert statuses == [202] * 24, statuses
    grown = peak_memory(accounts) - before
    # two hashes at a time: at most one more 64 MiB than the warm-up's (every thread at once: 5+ more)
    assert grown < 160 * MIB, f"peak memory grew {grown / MIB:.0f} MiB"


def test_signup_does_not_tell_whether_an_email_has_an_account(accounts: Pool) -> None:
    address = email("Taken")
    with client(accounts, "127.0.0.5") as first, client(accounts, "127.0.0.6") as second:
        started = cpu_seconds(accounts)
        new = first.post("/v1/auth/signup", json={"email": address, "password": PASSWORD})
        new_cpu = cpu_seconds(accounts) - started
        started = cpu_seconds(accounts)
        taken = second.post("/v1/auth/signup", json={"email": address.upper(), "password": "attacker password"})
        taken_cpu = cpu_seconds(accounts) - started
    # the same answer, and the same work (a hash) behind it
    assert (new.status_code, new.json()) == (taken.status_code, taken.json()) == (202, new.json())
    assert new.json() == {
        "email": address.lower(),
        "approvalRequired": False,
        "message": new.json()["message"],
    }
    assert taken_cpu >= new_cpu / 2, (new_cpu, taken_cpu)
    for reply in (new, taken):  # no session handed out
        assert "token" not in reply.text and "set-cookie" not in reply.headers

    # the taken email's login with the new password fails like any wrong password; the owner's works
    with client(accounts, "127.0.0.7") as login:
        attacker = login.post("/v1/auth/login", json={"email": address, "password": "attacker password"})
        wrong = login.post("/v1/auth/login", json={"email": email("nobody"), "password": "attacker password"})
        assert error_of(attacker, 401, "invalid_credentials") == error_of(wrong, 401, "invalid_credentials")
        owner = login.post("/v1/auth/login", json={"email": address, "password": PASSWORD})
        assert owner.status_code == 200, owner.text


def test_the_signup_page_signs_a_new_user_in_and_explains_a_taken_email(accounts: Pool) -> None:
    address = email("page")
    with client(accounts, "127.0.0.8") as browser:
        assert sign_up_page(browser, address, PASSWORD).status_code == 303  # signed up and in
        assert browser.get("/portal").status_code == 200
    with client(accounts, "127.0.0.9") as stranger:
        again = sign_up_page(stranger, address, "some other password")
        assert again.status_code == 401 and "pool_session" not in again.headers.get("set-cookie", "")
        assert "log in with that account&#39;s password" in again.text
        assert sign_up_page(stranger, address, PASSWORD).status_code == 303  # the owner, from anywhere


# --- approval ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def approving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    harness = bare_pool(tmp_path_factory.mktemp("approving"), signup_approval="true")
    try:
        yield harness
    finally:
        harness.stop()


def test_new_accounts_wait_for_an_operators_approval(approving: Pool) -> None:
    address = email("waiting")
    with client(approving, "127.0.0.10") as api:
        signup = api.post("/v1/auth/signup", json={"email": address, "password": PASSWORD})
        assert signup.status_code == 202 and signup.json()["approvalRequired"] is True, signup.text
        pending = api.post("/v1/auth/login", json={"email": address, "password": PASSWORD})
        assert "approval" in error_of(pending, 403, "policy_blocked")["message"]
        assert "token" not in pending.text
        error_of(
            api.post("/v1/auth/login", json={"email": address, "password": "wrong password"}),
            401,
            "invalid_credentials",
        )
    # the page says so too, and hands out no session
    with client(approving, "127.0.0.11") as browser:
        page = sign_up_page(browser, email("waiting-page"), PASSWORD)
        assert page.status_code == 200 and "wait for an operator" in page.text
        assert "pool_session" not in page.headers.get("set-cookie", "")
        assert browser.get("/portal").status_code == 302

    assert address in localpool.admin(approving.env, "pending-users")
    with pytest.raises(RuntimeError):
        localpool.admin(approving.env, "approve-user", "--email", email("nobody"))
    assert localpool.admin(approving.env, "approve-user", "--email", address) == f"approved {address}"
    assert address not in localpool.admin(approving.env, "pending-users")

    with client(approving, "127.0.0.10") as api:
        login = api.post("/v1/auth/login", json={"email": address, "password": PASSWORD})
        assert login.status_code == 200, login.text
        session = {"authorization": f"Bearer {login.json()['token']}"}
        key = api.post("/v1/tokens", json={"displayName": "approved"}, headers=session)
        assert key.status_code == 201, key.text
        assert api.get("/v1/credits", headers={"authorization": f"Bearer {key.json()['token']}"}).status_code == 200


# --- logout --------------------------------------------------------------------------------------


def test_logout_revokes_the_session_on_every_process_at_once(pg_url: str, tmp_path: Path) -> None:
    first = bare_pool(tmp_path, db_url=pg_url)
    port = localpool.free_port()
    second = localpool.start_coordinator(port, first.env, tmp_path, name="coordinator-second")
    other = f"http://127.0.0.1:{port}"
    try:
        address = email("logout")
        copied = first.sign_up(address, PASSWORD)["token"]
        kept = first.sign_up(address, PASSWORD)["token"]  # another session of the same user
        assert "jti" in jwt.decode(copied, options={"verify_signature": False})
        for url in (first.url, other):
            assert httpx.get(f"{url}/v1/tokens", headers=bearer(copied), timeout=10).status_code == 200

        # an expired revocation is pruned by the next logout
        asyncio.run(plant_expired_revocation(pg_url))
        assert httpx.post(f"{first.url}/v1/auth/logout", headers=bearer(copied), timeout=10).status_code == 204
        for url in (other, first.url):  # at once, on the other process too
            error_of(httpx.get(f"{url}/v1/tokens", headers=bearer(copied), timeout=10), 401, "invalid_session")
            error_of(httpx.post(f"{url}/v1/auth/logout", headers=bearer(copied), timeout=10), 401, "invalid_session")
        assert httpx.get(f"{other}/v1/tokens", headers=bearer(kept), timeout=10).status_code == 200
        assert asyncio.run(revoked_rows(pg_url)) == 1

        schema = httpx.get(f"{first.url}/schema/openapi.json", timeout=10).json()
        assert "post" in schema["paths"]["/v1/auth/logout"]
    finally:
        second.stop()
        first.stop()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def plant_expired_revocation(url: str) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(
            "INSERT INTO revoked_sessions (jti_digest, expires_at) VALUES ($1, now() - interval '1 minute')", "0" * 64
        )
    finally:
        await conn.close()


async def revoked_rows(url: str) -> int:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await conn.fetchval("SELECT COUNT(*) FROM revoked_sessions"))
    finally:
        await conn.close()


def test_the_logout_page_revokes_the_session_cookie(accounts: Pool) -> None:
    with client(accounts, "127.0.0.12") as browser:
        assert sign_up_page(browser, email("page-logout"), PASSWORD).status_code == 303
        copied = browser.cookies["pool_session"]
        home = browser.get("/portal")
        ended = browser.post("/portal/logout", data={"csrf": form_token(home)})
        assert (ended.status_code, ended.headers["location"]) == (303, "/portal/login")
    error_of(httpx.get(f"{accounts.url}/v1/tokens", headers=bearer(copied), timeout=10), 401, "invalid_session")
    replayed = httpx.get(f"{accounts.url}/portal", cookies={"pool_session": copied}, timeout=10)
    assert (replayed.status_code, replayed.headers["location"]) == (302, "/portal/login")


# --- CSRF: tokens the server minted, not cookies a client planted --------------------------------


def form_token(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text[:500]
    return found[1]


def plant(browser: httpx.Client, token: str) -> None:
    """Replace the browser's form cookie, as a sibling site or a plain-HTTP attacker could."""
    browser.cookies.delete("pool_csrf")
    browser.cookies.set("pool_csrf", token, domain="127.0.0.1", path="/portal")


def sign_up_page(browser: httpx.Client, address: str, password: str) -> httpx.Response:
    token = form_token(browser.get("/portal/signup"))
    return browser.post("/portal/signup", data={"csrf": token, "email": address, "password": password})


def test_planted_csrf_cookies_are_refused_and_change_nothing(accounts: Pool) -> None:
    planted = ["p" * 32, f"{'n' * 22}.{int(time.time())}.{'m' * 43}"]  # the old format, and a forged new one
    with client(accounts, "127.0.0.13") as victim:
        # before login: a cookie and field the server did not mint open no form
        address = email("planted")
        for token in planted:
            plant(victim, token)
            refused = victim.post("/portal/signup", data={"csrf": token, "email": address, "password": PASSWORD})
            assert refused.status_code == 403 and "expired" in refused.text
        victim.cookies.clear()
        login = victim.post("/v1/auth/login", json={"email": address, "password": PASSWORD})
        error_of(login, 401, "invalid_credentials")  # no account was made

        # signed in: the page's own token works; planted pairs, a minted nonce, or another session's
        # token do not
        assert sign_up_page(victim, email("victim"), PASSWORD).status_code == 303
        session = victim.cookies["pool_session"]
        own = form_token(victim.get("/portal"))
        with client(accounts, "127.0.0.14") as attacker:
            assert sign_up_page(attacker, email("attacker"), PASSWORD).status_code == 303
            theirs = form_token(attacker.get("/portal"))
            nonce = form_token(attacker.get("/portal/signup"))
        for token in [*planted, nonce, theirs]:
            plant(victim, token)
            forged = victim.post("/portal/keys", data={"csrf": token, "name": "planted"})
            assert (forged.status_code, forged.headers["location"]) == (303, "/portal?done=expired"), token
        made = victim.post("/portal/keys", data={"csrf": own, "name": "mine"})
        assert made.status_code == 200 and "pool_live_" in made.text
    names = [
        row["displayName"] for row in httpx.get(f"{accounts.url}/v1/tokens", headers=bearer(session)).json()["data"]
    ]
    assert names == ["mine"]
