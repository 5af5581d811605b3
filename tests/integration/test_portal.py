"""The portal and account APIs through a real coordinator (and real agents on stand-in backends):
signup (which never says whether an email has an account) and login, consumer keys and agent tokens
(create, use, revoke), isolation between users, keys vs sessions, admin top-ups,
credits/usage/generation/earnings, rate limits, 402, and that no secret, session or prompt is ever
stored or logged."""

from __future__ import annotations

import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from coordinator.identity import keys
from scripts import localpool
from tests.harness import ADMIN_TOKEN, CONSUMER, Pool
from tests.waiting import eventually

MODEL = "smollm2-135m"
AGENT_MODELS = [f"{MODEL}=standin-model"]

# Everything secret (or private) a test sent or received; test_no_secret_is_stored_or_logged looks for each.
SENT: set[str] = set()


# --- helpers -----------------------------------------------------------------------------------


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def call(pool: Pool, method: str, path: str, auth: str | None = None, **kw: Any) -> httpx.Response:
    headers = {**(bearer(auth) if auth else {}), **kw.pop("headers", {})}
    return httpx.request(method, f"{pool.url}{path}", headers=headers, timeout=30, **kw)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert the error envelope with ``status`` and ``code``; return its ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert error["code"] == code and error["message"], error
    return error


def unique_email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


class User:
    """A user who signed up through the portal."""

    def __init__(self, pool: Pool, tag: str) -> None:
        self.pool = pool
        self.email = unique_email(tag)
        self.password = f"pw-{uuid.uuid4().hex}"
        SENT.add(self.password)
        body = pool.sign_up(self.email, self.password)
        self.id: int = body["user"]["id"]
        self.jwt: str = body["token"]
        SENT.add(self.jwt)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return call(self.pool, "GET", path, self.jwt, **kw)

    def create(self, kind: str, name: str = "ci") -> dict[str, Any]:
        """Create a consumer key (``tokens``) or agent token (``agent-tokens``); returns the 201 body."""
        response = call(self.pool, "POST", f"/v1/{kind}", self.jwt, json={"displayName": name})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        SENT.add(created["token"])
        return created

    def listed(self, kind: str) -> list[dict[str, Any]]:
        response = self.get(f"/v1/{kind}")
        assert response.status_code == 200, response.text
        data: list[dict[str, Any]] = response.json()["data"]
        return data

    def revoke(self, kind: str, credential_id: int) -> httpx.Response:
        return call(self.pool, "DELETE", f"/v1/{kind}/{credential_id}", self.jwt)

    def credits(self) -> dict[str, Any]:
        response = self.get("/v1/credits")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


def topup(pool: Pool, amount: object, idem: str | None = None, **target: object) -> httpx.Response:
    headers = {"idempotency-key": idem or uuid.uuid4().hex}
    return call(pool, "POST", "/v1/admin/credits", ADMIN_TOKEN, json={"amountUsd": amount, **target}, headers=headers)


def prompt() -> str:
    text = f"distinctive prompt {uuid.uuid4().hex}"
    SENT.add(text)
    return text


def chat(pool: Pool, key: str, text: str | None = None) -> httpx.Response:
    return pool.post({"model": MODEL, "messages": [{"role": "user", "content": text or prompt()}]}, key=key)


def today() -> str:
    return datetime.now(UTC).date().isoformat()


@pytest.fixture
def served(pool: Pool) -> str:
    """One agent (the harness provider's) serving the model from a stand-in; returns the stand-in URL."""
    backend = pool.standin(chunks=4)
    pool.agent(backend, AGENT_MODELS)
    return backend


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A second coordinator with tiny limits: 3 requests per minute per key, 5 failed authentications
    per minute per address. Only the coordinator: its users sign up through the API."""
    harness = Pool(tmp_path_factory.mktemp("limited"), rate_limit_rpm="3", auth_failures_per_minute="5")
    harness.coordinator = localpool.start_coordinator(harness.port, harness.env, harness.dir)
    try:
        yield harness
    finally:
        harness.stop()


# --- 1. signup and login ------------------------------------------------------------------------


def test_signup_login_and_their_refusals(pool: Pool) -> None:
    email, password = unique_email("Alice"), f"pw-{uuid.uuid4().hex}"  # mixed case on purpose
    SENT.add(password)
    signup = call(pool, "POST", "/v1/auth/signup", json={"email": email, "password": password})
    assert signup.status_code == 202, signup.text
    accepted = signup.json()
    assert set(accepted) == {"email", "approvalRequired", "message"}, accepted  # no session: log in
    assert accepted["email"] == email.lower() and accepted["approvalRequired"] is False
    assert "set-cookie" not in signup.headers

    # login (email case and spaces do not matter), and the new session works
    login = call(pool, "POST", "/v1/auth/login", json={"email": f" {email.upper()} ", "password": password})
    assert login.status_code == 200, login.text
    body = login.json()
    assert set(body) == {"token", "tokenType", "expiresIn", "user"}
    assert body["tokenType"] == "Bearer" and body["expiresIn"] == 3600
    assert body["user"]["email"] == email.lower() and isinstance(body["user"]["id"], int)
    SENT.add(body["token"])
    assert call(pool, "GET", "/v1/tokens", body["token"]).status_code == 200

    # wrong password and unknown email look the same
    wrong = call(pool, "POST", "/v1/auth/login", json={"email": email, "password": password + "x"})
    unknown = call(pool, "POST", "/v1/auth/login", json={"email": unique_email("nobody"), "password": password})
    assert error_of(wrong, 401, "invalid_credentials") == error_of(unknown, 401, "invalid_credentials")
    assert "token" not in wrong.text

    # signing up again, whatever the case of the email, answers exactly as the first time and changes
    # nothing: the other password does not open the account, the first one still does
    for again in (email, email.upper()):
        duplicate = call(pool, "POST", "/v1/auth/signup", json={"email": again, "password": "another-password"})
        assert (duplicate.status_code, duplicate.json()) == (202, accepted), duplicate.text
        taken = call(pool, "POST", "/v1/auth/login", json={"email": again, "password": "another-password"})
        assert error_of(taken, 401, "invalid_credentials") == error_of(wrong, 401, "invalid_credentials")
    relogin = call(pool, "POST", "/v1/auth/login", json={"email": email, "password": password})
    assert relogin.status_code == 200 and relogin.json()["user"] == body["user"], relogin.text
    SENT.add(relogin.json()["token"])

    # bad input: 400 naming the field
    for payload, param in [
        ({"email": "not-an-email", "password": "long enough"}, "email"),
        ({"email": "a b@example.com", "password": "long enough"}, "email"),
        ({"email": unique_email("short"), "password": "short"}, "password"),
        ({"email": unique_email("short"), "password": "1234567"}, "password"),
        ({"password": "long enough"}, "email"),
        ({"email": unique_email("nopw")}, "password"),
    ]:
        refused = call(pool, "POST", "/v1/auth/signup", json=payload)
        assert error_of(refused, 400, "invalid_request")["param"] == param, (payload, refused.text)


# --- 2. tokens API ------------------------------------------------------------------------------


def test_consumer_key_create_use_revoke(pool: Pool, served: str) -> None:
    user = User(pool, "keys")
    assert topup(pool, "5", userId=user.id).status_code == 201

    created = user.create("tokens", "laptop")
    secret = created["token"]
    assert set(created) == {"id", "displayName", "prefix", "createdAt", "token"}
    assert keys.is_well_formed(secret, "pool_live_") and created["displayName"] == "laptop"
    assert created["prefix"].endswith("…") and secret.startswith(created["prefix"][:-1])
    assert len(created["prefix"][:-1]) < len(secret) // 2

    listing = user.get("/v1/tokens")
    assert secret not in listing.text and secret[len(created["prefix"]) :] not in listing.text
    [row] = listing.json()["data"]
    assert set(row) == {"id", "displayName", "prefix", "createdAt", "lastUsedAt"}
    assert (row["id"], row["displayName"], row["prefix"]) == (created["id"], "laptop", created["prefix"])

    works = chat(pool, secret)
    assert works.status_code == 200, works.text
    assert works.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3"

    assert user.revoke("tokens", created["id"]).status_code == 204
    revoked_at = time.monotonic()
    eventually(lambda: chat(pool, secret).status_code == 401, timeout=1.5)  # a revoked key stops working
    assert time.monotonic() - revoked_at <= 1.5
    error_of(chat(pool, secret), 401, "invalid_api_key")
    assert user.listed("tokens") == []
    error_of(user.revoke("tokens", created["id"]), 404, "not_found")  # already revoked

    # display names are checked
    for name in ["", "x" * 101, "tab\there"]:
        bad = call(pool, "POST", "/v1/tokens", user.jwt, json={"displayName": name})
        assert error_of(bad, 400, "invalid_request")["param"] == "displayName", name


def test_agent_token_create_connect_revoke(pool: Pool) -> None:
    provider = User(pool, "provider")
    created = provider.create("agent-tokens", "rig-1")
    secret = created["token"]
    assert keys.is_well_formed(secret, "pool_agent_") and secret.startswith(created["prefix"][:-1])
    listing = provider.get("/v1/agent-tokens")
    assert secret not in listing.text
    assert [(r["id"], r["prefix"]) for r in listing.json()["data"]] == [(created["id"], created["prefix"])]
    assert provider.listed("tokens") == []  # the two kinds are separate lists

    backend = pool.standin(chunks=2)
    agent = pool.agent(backend, AGENT_MODELS, token=secret)
    assert pool.agent_count() == 1

    assert provider.revoke("agent-tokens", created["id"]).status_code == 204
    pool.wait_agent_count(0, timeout=3)
    assert provider.listed("agent-tokens") == []

    # the agent's reconnect is refused: it gives up (exit 1) instead of retrying forever
    assert agent.popen.wait(timeout=10) == 1, agent.output()[-2000:]
    assert "refused the agent token" in agent.output()
    assert pool.agent_count() == 0
    ws_url = pool.url.replace("http://", "ws://") + "/v1/agent/connect"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(ws_url, additional_headers=bearer(secret), open_timeout=5).close()
    assert refused.value.response.status_code == 401


# --- 3. isolation -------------------------------------------------------------------------------


def test_users_cannot_see_or_touch_each_others_keys(pool: Pool, served: str) -> None:
    alice, bob = User(pool, "alice"), User(pool, "bob")
    assert topup(pool, "1", userId=alice.id).status_code == 201
    alice_key = alice.create("tokens")
    alice_agent = alice.create("agent-tokens")
    bob_key = bob.create("tokens")

    # listings are per user
    assert [r["id"] for r in bob.listed("tokens")] == [bob_key["id"]]
    assert bob.listed("agent-tokens") == []
    assert [r["id"] for r in alice.listed("tokens")] == [alice_key["id"]]

    # revoking someone else's key looks exactly like revoking a key that does not exist, and does nothing
    for kind, credential in (("tokens", alice_key), ("agent-tokens", alice_agent)):
        theirs = bob.revoke(kind, credential["id"])
        missing = bob.revoke(kind, 2**31 - 1)
        assert error_of(theirs, 404, "not_found") == error_of(missing, 404, "not_found")
    served_request = chat(pool, alice_key["token"])  # first use: looked up in the database, not a cache
    assert served_request.status_code == 200, served_request.text
    request_id = served_request.headers["x-request-id"]
    # the moment Alice sees her generation (still in memory, before the log flush), Bob does not
    eventually(lambda: alice.get(f"/v1/generation/{request_id}").status_code == 200, timeout=2)
    for auth in (bob.jwt, bob_key["token"]):
        error_of(call(pool, "GET", f"/v1/generation/{request_id}", auth), 404, "not_found")
    assert [r["id"] for r in alice.listed("tokens")] == [alice_key["id"]]
    assert [r["id"] for r in alice.listed("agent-tokens")] == [alice_agent["id"]]

    # generations (now from the database: reading usage flushes the request log) and usage are per user
    alice_usage = alice.get("/v1/usage", params={"from": today(), "to": today()}).json()["data"]
    assert [row["model"] for row in alice_usage] == [MODEL]
    for auth in (bob.jwt, bob_key["token"]):
        error_of(call(pool, "GET", f"/v1/generation/{request_id}", auth), 404, "not_found")
        usage = call(pool, "GET", "/v1/usage", auth, params={"from": today(), "to": today()})
        assert usage.status_code == 200 and usage.json()["data"] == [], usage.text
        assert call(pool, "GET", "/v1/credits", auth).json()["balanceNano"] == 0


# --- 4. keys are not sessions, sessions are not keys --------------------------------------------


def test_keys_and_sessions_are_not_interchangeable(pool: Pool) -> None:
    user = User(pool, "mixup")
    key = user.create("tokens")["token"]
    agent_token = user.create("agent-tokens")["token"]
    for secret in (key, agent_token, pool.key, pool.token):
        error_of(call(pool, "GET", "/v1/tokens", secret), 401, "invalid_session")
        error_of(call(pool, "GET", "/v1/agent-tokens", secret), 401, "invalid_session")
        error_of(call(pool, "POST", "/v1/tokens", secret, json={"displayName": "x"}), 401, "invalid_session")
    error_of(call(pool, "DELETE", f"/v1/tokens/{user.listed('tokens')[0]['id']}", key), 401, "invalid_session")
    error_of(chat(pool, user.jwt), 401, "invalid_api_key")
    error_of(chat(pool, agent_token), 401, "invalid_api_key")
    # the account endpoints take either a session or a consumer key, never an agent token
    assert call(pool, "GET", "/v1/credits", key).status_code == 200
    assert call(pool, "GET", "/v1/credits", user.jwt).status_code == 200
    error_of(call(pool, "GET", "/v1/credits", agent_token), 401, "invalid_session")
    assert len(user.listed("tokens")) == 1  # nothing was created by the refused calls


# --- 5. admin top-ups ---------------------------------------------------------------------------


def test_admin_topup_is_authenticated_and_idempotent(pool: Pool) -> None:
    user = User(pool, "topup")
    body = {"amountUsd": "2.5", "userId": user.id}
    idem = {"idempotency-key": f"topup-{uuid.uuid4().hex}"}
    url = "/v1/admin/credits"

    error_of(call(pool, "POST", url, json=body, headers=idem), 401, "invalid_api_key")
    error_of(call(pool, "POST", url, "wrong-admin-token", json=body, headers=idem), 401, "invalid_api_key")
    error_of(call(pool, "POST", url, pool.key, json=body, headers=idem), 401, "invalid_api_key")
    error_of(call(pool, "POST", url, user.jwt, json=body, headers=idem), 401, "invalid_api_key")
    error_of(call(pool, "POST", url, ADMIN_TOKEN, json=body), 400, "invalid_request")
    assert user.credits()["balanceNano"] == 0

    first = call(pool, "POST", url, ADMIN_TOKEN, json=body, headers=idem)
    second = call(pool, "POST", url, ADMIN_TOKEN, json=body, headers=idem)
    assert first.status_code == 201 and second.status_code == 201, (first.text, second.text)
    assert "idempotent-replayed" not in first.headers
    assert second.headers.get("idempotent-replayed") == "true"
    assert first.json()["amountNano"] == 2_500_000_000 and first.json()["userId"] == user.id
    assert second.json() == first.json()
    assert user.credits()["balanceNano"] == 2_500_000_000  # credited once

    # the same key with another body is refused, and grants nothing
    for other in ({"amountUsd": "3", "userId": user.id}, {"amountUsd": "2.5", "email": CONSUMER}):
        conflict = call(pool, "POST", url, ADMIN_TOKEN, json=other, headers=idem)
        error_of(conflict, 422, "idempotency_key_reused")
    assert user.credits()["balanceNano"] == 2_500_000_000

    for amount in ["abc", -1, 0, "0", "0.0000000001", "NaN", "Infinity", 1_000_001, ""]:
        bad = topup(pool, amount, userId=user.id)
        assert error_of(bad, 400, "invalid_request")["param"] == "amountUsd", (amount, bad.text)
    error_of(topup(pool, "1", email=unique_email("ghost")), 404, "not_found")
    assert user.credits()["balanceNano"] == 2_500_000_000


# --- 6. account API after one served request ----------------------------------------------------


def test_account_api_after_one_request(pool: Pool) -> None:
    provider, consumer = User(pool, "earner"), User(pool, "spender")
    token = provider.create("agent-tokens")["token"]
    backend = pool.standin(chunks=4)
    # 7 and 13 nano-USD per token: 5 prompt + 4 completion tokens cost 87, the provider earns 78.3 -> 78
    pool.agent(backend, AGENT_MODELS, token=token, price_in="0.007", price_out="0.013")
    assert topup(pool, "1", userId=consumer.id).status_code == 201
    key = consumer.create("tokens")["token"]
    before = consumer.credits()
    assert (before["balanceNano"], before["heldNano"]) == (1_000_000_000, 0)

    response = chat(pool, key)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    x_pool = response.json()["x_pool"]
    assert x_pool["request_id"] == request_id and x_pool["provider"] == provider.id

    generation = consumer.get(f"/v1/generation/{request_id}")
    assert generation.status_code == 200, generation.text
    gen = generation.json()
    assert gen["id"] == request_id and gen["model"] == MODEL and gen["status"] == 200
    assert (gen["promptTokens"], gen["completionTokens"]) == (5, 4)
    assert gen["costNano"] == 5 * 7 + 4 * 13 == 87
    assert gen["provider"] == provider.id and gen["agentId"].startswith("agt_")
    assert gen["fallback"] is False and gen["stream"] is False and gen["errorCode"] is None
    assert gen["latencyMs"] >= 0 and gen["usageCapped"] is False
    assert call(pool, "GET", f"/v1/generation/{request_id}", key).json()["id"] == request_id  # by key too

    def settled() -> dict[str, Any] | None:
        money = consumer.credits()
        return money if money["heldNano"] == 0 and money["balanceNano"] < 1_000_000_000 else None

    money = eventually(settled, timeout=3, explain=consumer.credits)
    assert money["balanceNano"] == 1_000_000_000 - 87 and money["availableNano"] == money["balanceNano"]

    # A body refused before its model was read is the consumer's request, at no cost, under no model:
    # in the generation endpoint, not a row of the per-model usage.
    refused = pool.post(content=b'{"model": ', key=key)
    assert error_of(refused, 400, "invalid_request")
    logged = consumer.get(f"/v1/generation/{refused.headers['x-request-id']}").json()
    assert (logged["status"], logged["costNano"]) == (400, 0)

    usage = consumer.get("/v1/usage", params={"from": today(), "to": today()})
    assert usage.status_code == 200
    body = usage.json()
    assert (body["fromDate"], body["toDate"]) == (today(), today())
    [row] = body["data"]
    assert (row["date"], row["model"], row["requests"], row["failedRequests"]) == (today(), MODEL, 1, 0)
    assert (row["promptTokens"], row["completionTokens"], row["costNano"]) == (5, 4, 87)
    assert consumer.get("/v1/usage").json()["data"] == body["data"]  # default range includes today

    earnings = provider.get("/v1/provider/earnings", params={"from": today(), "to": today()})
    assert earnings.status_code == 200, earnings.text
    earned = earnings.json()
    assert earned["balanceNano"] == 87 * 9000 // 10000 == 78
    [erow] = earned["data"]
    assert (erow["model"], erow["requests"], erow["earnedNano"]) == (MODEL, 1, 78)
    assert consumer.get("/v1/provider/earnings").json()["data"] == []  # the consumer earned nothing

    for path in ("/v1/usage", "/v1/provider/earnings"):
        for params, param in [
            ({"from": "2024-13-01"}, "from"),
            ({"from": "yesterday"}, "from"),
            ({"to": "2024-02-30"}, "to"),
            ({"to": "soon"}, "to"),
            ({"from": "2024-02-02", "to": "2024-02-01"}, "from"),
            ({"from": "2020-01-01", "to": "2024-01-01"}, "from"),
        ]:
            bad = consumer.get(path, params=params)
            assert error_of(bad, 400, "invalid_request")["param"] == param, (path, params, bad.text)


# --- 8. 402 -------------------------------------------------------------------------------------


def test_no_credits_402_before_anything_runs(pool: Pool) -> None:
    backend = pool.standin(chunks=2)
    pool.agent(backend, AGENT_MODELS)
    first = prompt()
    assert chat(pool, pool.key, first).status_code == 200  # the stand-in is reachable
    broke = User(pool, "broke")
    key = broke.create("tokens")["token"]
    second = prompt()
    response = chat(pool, key, second)
    error = error_of(response, 402, "insufficient_credits")
    assert error["type"] == "insufficient_quota"
    assert "x-ratelimit-limit-requests" in response.headers
    last = httpx.get(f"{backend}/_last", timeout=5).text
    assert first in last and second not in last
    # Nothing to wait for, so a sleep: that nothing changes later either. 0.3 s is the harness's
    # credit-lease idle time, after which background work on a lease would have shown.
    time.sleep(0.3)
    assert broke.credits() == {
        "balanceUsd": 0.0,
        "heldUsd": 0.0,
        "availableUsd": 0.0,
        "balanceNano": 0,
        "heldNano": 0,
        "availableNano": 0,
        "owedUsd": 0.0,
        "owedNano": 0,
    }


# --- 9. nothing secret is stored or logged ------------------------------------------------------


def _stored_text(db_url: str) -> list[tuple[str, str, str]]:
    """(table, column, value) for every text value in a SQLite database."""
    path = db_url.split(":///", 1)[1]
    out: list[tuple[str, str, str]] = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        value = value.decode(errors="replace")
                    if isinstance(value, str):
                        out.append((table, column, value))
    return out


def _needles(secret: str) -> list[str]:
    """The secret and a long tail of it (a truncated copy is a leak too)."""
    if secret.count(".") == 2 and secret.startswith("eyJ"):  # a JWT: its signature is the secret part
        return [secret, secret.rsplit(".", 1)[1]]
    return [secret, secret[-24:]]


def test_no_secret_is_stored_or_logged(pool: Pool) -> None:
    # run a full flow here too, so this test proves something even when run alone
    provider, consumer = User(pool, "scan-provider"), User(pool, "scan-consumer")
    agent_token = provider.create("agent-tokens")["token"]
    pool.agent(pool.standin(chunks=2), AGENT_MODELS, token=agent_token)
    assert topup(pool, "1", userId=consumer.id).status_code == 201
    key = consumer.create("tokens")["token"]
    assert chat(pool, key).status_code == 200
    streamed = pool.post({"model": MODEL, "messages": [{"role": "user", "content": prompt()}], "stream": True}, key=key)
    assert streamed.status_code == 200
    call(pool, "GET", "/v1/tokens", key)  # refused: a key as a session
    chat(pool, consumer.jwt)  # refused: a session as a key
    SENT.update({pool.key, pool.token})
    eventually(lambda: consumer.credits()["heldNano"] == 0, timeout=3)  # both requests settled
    assert len(consumer.get("/v1/usage").json()["data"]) == 1  # reading usage flushes the request log

    secrets = sorted(SENT)
    assert len(secrets) >= 8
    stored = _stored_text(pool.db_url)
    assert any(table == "api_keys" for table, _, _ in stored)  # the scan sees the tables
    logs = {p.name: p.read_text(errors="replace") for p in Path(pool.dir).glob("*.log")}
    logs = {name: text for name, text in logs.items() if name.startswith(("coordinator", "agent"))}
    assert "coordinator.log" in logs and any(name.startswith("agent") for name in logs)
    leaks = []
    for secret in secrets:
        for needle in _needles(secret):
            leaks += [f"db {t}.{c}" for t, c, value in stored if needle in value]
            leaks += [f"log {name}" for name, text in logs.items() if needle in text]
    assert not leaks, leaks


# --- 10. portal pages without a browser ----------------------------------------------------------


def test_pages_without_a_session_lead_to_login_and_the_api_is_untouched(pool: Pool) -> None:
    for path in ("/portal", "/portal/provider", "/portal/keys/1/revoke"):
        response = httpx.get(f"{pool.url}{path}", timeout=10)
        assert (response.status_code, response.headers["location"]) == (302, "/portal/login"), path
        assert response.headers["cache-control"] == "no-store"
    # a portal JWT in a cookie is not an API credential, and an API key is not a page session
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    refused = httpx.post(f"{pool.url}/v1/chat/completions", json=body, timeout=10)
    assert refused.status_code == 401
    page = httpx.get(f"{pool.url}/portal", cookies={"pool_session": pool.key}, timeout=10)
    assert page.status_code == 302
    schema = httpx.get(f"{pool.url}/schema/openapi.json", timeout=10).json()
    assert {"/status", "/status/live", "/portal", "/portal/provider"} <= schema["paths"].keys()


def test_session_cookies_are_secure_unless_on_loopback(pool: Pool) -> None:
    # behind a TLS proxy the pool may see plain HTTP: cookies are Secure for any host but loopback
    for host, secure in (("127.0.0.1", False), ("pool.example", True)):
        form = httpx.get(f"{pool.url}/portal/signup", headers={"host": host}, timeout=10)
        cookie = next(c for c in form.headers.get_list("set-cookie") if c.startswith("pool_csrf="))
        assert ("Secure" in cookie) is secure, cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/;" in cookie
    with httpx.Client(base_url=pool.url, timeout=10) as client:
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/portal/signup").text)
        assert csrf is not None
        done = client.post(
            "/portal/signup", data={"csrf": csrf[1], "email": "cookie@example.com", "password": "correct horse battery"}
        )
        assert done.status_code == 303
        session = next(c for c in done.headers.get_list("set-cookie") if c.startswith("pool_session="))
        assert "HttpOnly" in session and "SameSite=strict" in session and "Path=/;" in session
        assert "Max-Age=3600" in session  # as long as the JWT inside it


# --- 7. rate limits (own coordinator; the auth-failure test blocks 127.0.0.1, so it goes last) ---

LIMIT_HEADERS = [
    f"x-ratelimit-{what}-{unit}" for unit in ("requests", "tokens") for what in ("limit", "remaining", "reset")
]


def limited_consumer(pool: Pool) -> User:
    user = User(pool, "limited")
    assert topup(pool, "1", userId=user.id).status_code == 201
    return user


def test_requests_per_minute_limit(limited: Pool) -> None:
    provider = User(limited, "limited-provider")
    limited.agent(limited.standin(chunks=2), AGENT_MODELS, token=provider.create("agent-tokens")["token"])
    consumer = limited_consumer(limited)
    key, other = consumer.create("tokens")["token"], consumer.create("tokens")["token"]
    remaining = []
    for _ in range(3):
        ok = chat(limited, key)
        assert ok.status_code == 200, ok.text
        assert all(h in ok.headers for h in LIMIT_HEADERS), dict(ok.headers)
        assert ok.headers["x-ratelimit-limit-requests"] == "3"
        assert int(ok.headers["x-ratelimit-limit-tokens"]) == 2_000_000
        remaining.append(int(ok.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]

    refused = chat(limited, key)
    error = error_of(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert all(h in refused.headers for h in LIMIT_HEADERS), dict(refused.headers)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request refills in 20 s at 3/min
    reset = refused.headers["x-ratelimit-reset-requests"]
    assert reset.endswith("s") and reset != "0s"

    # limits are per key: another key of the same user is not limited
    assert chat(limited, other).status_code == 200


def test_failed_authentications_block_the_address(limited: Pool) -> None:
    consumer = limited_consumer(limited)
    valid = consumer.create("tokens")["token"]
    assert call(limited, "GET", "/v1/credits", valid).status_code == 200
    bad_keys = [keys.generate("pool_live_"), "pool_live_nope", "sk-123", keys.generate("pool_live_"), "x"]
    for bad in bad_keys:
        error_of(chat(limited, bad), 401, "invalid_api_key")
    blocked = chat(limited, valid)
    error = error_of(blocked, 429, "rate_limit_exceeded")
    assert "Retry in" in error["message"]
    assert 10 <= int(blocked.headers["retry-after"]) <= 12  # one failure refills in 12 s at 5/min
    # the block covers every authenticated route from that address, sessions and the right password too
    error_of(call(limited, "GET", "/v1/credits", valid), 429, "rate_limit_exceeded")
    error_of(consumer.get("/v1/tokens"), 429, "rate_limit_exceeded")
    login = call(limited, "POST", "/v1/auth/login", json={"email": consumer.email, "password": consumer.password})
    error_of(login, 429, "rate_limit_exceeded")
