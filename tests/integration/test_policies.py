"""Key policies through real coordinator and agent processes and the OpenAI SDK (stand-in backends
for the agent and the platform upstream): a key's owner sets its policy in the portal API, and every
request is checked before anything is held or dispatched: paused (403 ``api_disabled``), allowed
models and price cap (403 ``policy_blocked``, or only agents the cap admits), and the privacy tier
(``trusted``: no agent below the operator's trust level sees the prompt; ``platform``: only the
upstream). The project label lands in the request log. Storage of a policy runs on both databases."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from sqlalchemy import select

from coordinator.core import db
from coordinator.core.models import KeyBudgetRow
from coordinator.identity import keys, users
from coordinator.identity.policies import KeyPolicy, MaxPrice, PolicyError
from coordinator.money import budgets
from scripts import localpool
from tests.harness import Pool, key_id_of, last_request, with_upstream
from tests.waiting import eventually

SLUG = "smollm2-135m"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def policed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A coordinator whose upstream (a stand-in) serves ``smollm2-135m`` too, and one new agent
    (trust 50 at first, rising with each job it completes: above the pool's threshold, and below
    the trusted tier's 99 for the few dozen jobs of this module). Not named ``pool``: that
    fixture's agents are stopped after every test."""
    harness = with_upstream(  # a free fallback on purpose: the price cap test sends requests there
        tmp_path_factory.mktemp("policies"),
        f"{SLUG}=upstream-smol",
        trusted_tier_trust="99",
        upstream_price_in="0",
        upstream_price_out="0",
    )
    harness.start()
    try:
        harness.extra["agent_backend"] = backend = harness.standin()
        harness.agent(backend, [SLUG], max_concurrency=8)
        yield harness
    finally:
        harness.stop()


class Owner:
    """A signed-up user with credits, one consumer key, and a portal session to set its policy."""

    def __init__(self, pool: Pool) -> None:
        email = f"owner-{secrets.token_hex(3)}@example.com"
        session = pool.sign_up(email, "correct horse battery staple")
        pool.grant(email, "5")
        self.pool, self.portal = pool, {"authorization": f"Bearer {session['token']}"}
        created = httpx.post(f"{pool.url}/v1/tokens", json={"displayName": "k"}, headers=self.portal, timeout=10)
        assert created.status_code == 201, created.text
        self.key_id, self.key = created.json()["id"], created.json()["token"]

    def put(self, policy: dict[str, Any], key_id: int | None = None) -> httpx.Response:
        url = f"{self.pool.url}/v1/tokens/{key_id or self.key_id}/policy"
        return httpx.put(url, json=policy, headers=self.portal, timeout=10)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.pool.url}/v1", api_key=self.key, max_retries=0)

    def balance(self) -> str:
        body = httpx.get(f"{self.pool.url}/v1/credits", headers={"authorization": f"Bearer {self.key}"}, timeout=10)
        return str(body.json())


def _x_pool(reply: Any) -> dict[str, Any]:
    return dict((reply.model_extra or {})["x_pool"])


def test_a_policy_is_set_and_read_by_the_keys_owner_only(policed: Pool) -> None:
    pool = policed
    owner, other = Owner(pool), Owner(pool)
    read = httpx.get(f"{pool.url}/v1/tokens/{owner.key_id}/policy", headers=owner.portal, timeout=10)
    assert read.status_code == 200 and read.json() == {}  # no policy: everything allowed
    policy = {"models": ["smollm2"], "maxPrice": {"prompt": 1.0, "completion": 2.0}, "privacy": "trusted"}
    set_ = owner.put({**policy, "project": "web"})
    assert set_.status_code == 200, set_.text
    read = httpx.get(f"{pool.url}/v1/tokens/{owner.key_id}/policy", headers=owner.portal, timeout=10)
    assert read.json() == {**policy, "project": "web"}
    for bad, param in (({"privacy": "secret"}, None), ({"colour": "red"}, None), ({"models": [""]}, "models")):
        refused = owner.put(bad)
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error", refused.text
        if param:
            assert refused.json()["error"]["param"] == param
    assert other.put({"paused": True}, key_id=owner.key_id).status_code == 404  # not theirs: no such key
    assert httpx.get(f"{pool.url}/v1/tokens/{owner.key_id}/policy", timeout=10).status_code == 401


def test_a_paused_key_is_refused_before_anything_is_held_and_resumes_at_once(policed: Pool) -> None:
    pool = policed
    owner = Owner(pool)
    assert owner.client().chat.completions.create(model=SLUG, messages=MSG).choices  # type: ignore[arg-type]
    before = owner.balance()
    assert owner.put({"paused": True}).status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as refused:
        owner.client().chat.completions.create(model=SLUG, messages=MSG)  # type: ignore[arg-type]
    assert refused.value.code == "api_disabled"
    assert owner.balance() == before  # nothing held, nothing charged
    assert owner.put({}).status_code == 200  # resumed: the cached key was forgotten, no wait
    assert owner.client().chat.completions.create(model=SLUG, messages=MSG).choices  # type: ignore[arg-type]


def test_a_model_outside_the_policy_is_refused_naming_the_rule(policed: Pool) -> None:
    pool = policed
    owner = Owner(pool)
    assert owner.put({"models": ["gemma"]}).status_code == 200  # a family
    with pytest.raises(openai.PermissionDeniedError) as refused:
        owner.client().chat.completions.create(model=SLUG, messages=MSG)  # type: ignore[arg-type]
    assert refused.value.code == "policy_blocked" and "models" in str(refused.value.message)
    assert owner.put({"models": ["gemma", SLUG]}).status_code == 200  # a slug
    assert owner.client().chat.completions.create(model=SLUG, messages=MSG).choices  # type: ignore[arg-type]


def test_the_price_cap_leaves_out_dearer_agents(policed: Pool) -> None:
    pool = policed
    """The agent asks $0.1 / $0.2 per 1M tokens; the upstream's price is 0. A cap under the agent's
    price sends the request to the upstream; a cap over it lets the agent serve."""
    owner = Owner(pool)
    assert owner.put({"maxPrice": {"prompt": 0.05, "completion": 0.05}}).status_code == 200
    reply = owner.client().chat.completions.create(model=SLUG, messages=MSG)  # type: ignore[arg-type]
    assert _x_pool(reply)["fallback"] is True
    assert owner.put({"maxPrice": {"prompt": 1, "completion": 1}, "project": "billing"}).status_code == 200
    reply = owner.client().chat.completions.create(model=SLUG, messages=MSG)  # type: ignore[arg-type]
    x_pool = _x_pool(reply)
    assert x_pool["fallback"] is False and x_pool["tier"] == "any"
    query = "SELECT project FROM request_log WHERE id = ?"
    assert eventually(lambda: pool.query(query, x_pool["request_id"])) == [("billing",)]  # once written


def test_privacy_tiers_decide_who_sees_the_prompt(policed: Pool) -> None:
    pool = policed
    owner = Owner(pool)
    agent_backend = pool.extra["agent_backend"]
    for tier in ("trusted", "platform"):  # the agent is below the trusted tier (99)
        assert owner.put({"privacy": tier}).status_code == 200
        marker = f"secret-{tier}-{secrets.token_hex(4)}"
        reply = owner.client().chat.completions.create(
            model=SLUG,
            messages=[{"role": "user", "content": marker}],  # type: ignore[list-item]
        )
        x_pool = _x_pool(reply)
        assert x_pool["fallback"] is True and x_pool["tier"] == tier
        assert marker not in str(last_request(agent_backend))  # the agent never saw it
        assert marker in str(last_request(pool.extra["upstream"]))
    assert owner.put({"privacy": "platform"}).status_code == 200
    with pytest.raises(openai.APIStatusError) as refused:  # the request asks for agents only: nobody may serve
        owner.client().chat.completions.create(
            model=SLUG,
            messages=MSG,  # type: ignore[arg-type]
            extra_body={"provider": {"allow_fallbacks": False}},
        )
    assert refused.value.status_code == 503


def test_data_protection_blocks_redacts_or_keeps_prompts_private(policed: Pool) -> None:
    pool = policed
    owner = Owner(pool)
    agent_backend, upstream = pool.extra["agent_backend"], pool.extra["upstream"]
    dlp_policy = {"secret": "block", "email": "redact", "card": "redact", "iban": "redact", "phone": "private"}
    assert owner.put({"dlp": dlp_policy}).status_code == 200

    before = owner.balance()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        owner.client().chat.completions.create(
            model=SLUG,
            messages=[{"role": "user", "content": "deploy with AKIAIOSFODNN7EXAMPLE please"}],  # type: ignore[list-item]
        )
    assert refused.value.code == "policy_blocked" and "dlp.secret" in str(refused.value.message)
    assert "AKIA" not in str(refused.value.message)  # the rule is named, never the text
    assert owner.balance() == before  # blocked before anything was held

    secrets_in_prompt = ["ann@example.org", "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32"]
    prompt = f"Mail {secrets_in_prompt[0]} about card {secrets_in_prompt[1]} and IBAN {secrets_in_prompt[2]}; "
    prompt += f"cc {secrets_in_prompt[0]}."
    reply = owner.client().chat.completions.create(
        model=SLUG,
        messages=[{"role": "user", "content": prompt}],  # type: ignore[list-item]
    )
    assert _x_pool(reply)["fallback"] is False  # nothing private: the agent served, redacted
    received = str(last_request(agent_backend))
    assert "[EMAIL_1]" in received and "[CARD_1]" in received and "[IBAN_1]" in received
    for value in secrets_in_prompt:
        for piece in (value, value.replace(" ", "")[:8], value.split("@")[0] + "@"):
            assert piece not in received, piece  # no original substring of a match reaches the agent
    assert received.count("[EMAIL_1]") == 2  # the same value, the same placeholder

    marker = secrets.token_hex(4)
    reply = owner.client().chat.completions.create(
        model=SLUG,
        messages=[{"role": "user", "content": f"{marker}: call +44 20 7946 0958"}],  # type: ignore[list-item]
    )
    x_pool = _x_pool(reply)
    assert x_pool["fallback"] is True and x_pool["tier"] == "trusted"  # the agent is not trusted enough
    assert marker not in str(last_request(agent_backend)) and marker in str(last_request(upstream))

    listed = httpx.get(f"{pool.url}/v1/requests", headers={"authorization": f"Bearer {owner.key}"}, timeout=10)
    found = [row["dlp"] for row in listed.json()["data"]]
    assert found[:3] == [{"phone": 1}, {"email": 2, "card": 1, "iban": 1}, {"secret": 1}]  # counts, never text
    assert "AKIA" not in listed.text and "ann@" not in listed.text


SAMPLES = {
    "secret": "ghp_abcdefghijklmnopqrstuvwxyz0123456789AB",
    "card": "5500 0000 0000 0004",
    "iban": "DE89370400440532013000",
    "email": "zoe.q@example.net",
    "phone": "+33 1 42 68 53 00",
}


@pytest.mark.parametrize("detector", sorted(SAMPLES))
def test_each_detector_with_each_action(policed: Pool, detector: str) -> None:
    pool = policed
    owner = Owner(pool)
    value, agent_backend, upstream = SAMPLES[detector], pool.extra["agent_backend"], pool.extra["upstream"]
    for action in ("block", "redact", "private"):
        assert owner.put({"dlp": {detector: action}}).status_code == 200
        marker = secrets.token_hex(4)
        messages = [{"role": "user", "content": f"{marker} {value} {marker}"}]
        if action == "block":
            before = owner.balance()
            with pytest.raises(openai.PermissionDeniedError) as refused:
                owner.client().chat.completions.create(model=SLUG, messages=messages)  # type: ignore[arg-type]
            assert f"dlp.{detector}" in str(refused.value.message) and value not in str(refused.value.message)
            assert owner.balance() == before and marker not in str(last_request(agent_backend))
            continue
        reply = owner.client().chat.completions.create(model=SLUG, messages=messages)  # type: ignore[arg-type]
        if action == "redact":
            received = str(last_request(agent_backend))
            assert marker in received and f"[{detector.upper()}_1]" in received and value not in received
        else:  # private: only the trusted tier (no agent here) or the upstream
            assert _x_pool(reply)["fallback"] is True and marker not in str(last_request(agent_backend))
            assert value in str(last_request(upstream))


async def test_a_policy_is_stored_with_its_key(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        async with db.sessionmaker(engine)() as session, session.begin():
            user = await users.create_user(session, "policy@example.com")
            row, secret = await users.create_credential(session, users.ApiKey, user.id, "k")
        policy = KeyPolicy(models=["smollm2"], max_price=MaxPrice(0.5, None), privacy="platform", project="p")
        async with db.sessionmaker(engine)() as session, session.begin():
            assert await users.set_key_policy(session, row.id, policy, user.id)
            assert not await users.set_key_policy(session, row.id, policy, user.id + 1)  # not theirs
        async with db.sessionmaker(engine)() as session:
            principal = await users.find_api_key(session, keys.digest(secret))
            assert principal is not None and principal.policy == policy
            assert await users.key_policy(session, row.id) == policy
        with pytest.raises(PolicyError):
            KeyPolicy(project="x" * 101).check()
        async with db.sessionmaker(engine)() as session, session.begin():
            assert await users.set_key_policy(session, row.id, KeyPolicy(), user.id)  # allows everything again
        async with db.sessionmaker(engine)() as session:
            principal = await users.find_api_key(session, keys.digest(secret))
            assert principal is not None and principal.policy is None
    finally:
        await engine.dispose()


@pytest.mark.parametrize("binding", [budgets.DAY, budgets.MONTH])
async def test_spend_caps_hold_over_processes_that_lease_the_budget(db_url: str, binding: str) -> None:
    """Two processes' budgets on one database (two engines, as two processes have): together they
    never hold more than the cap (the day's or the month's, whichever is lower), what they give
    back is free for the other, and the table ends up counting exactly what was spent."""
    engines = [db.create_engine(db_url), db.create_engine(db_url)]
    try:
        await db.migrate(engines[0])
        async with db.sessionmaker(engines[0])() as session, session.begin():
            user = await users.create_user(session, "caps@example.com")
            row, _ = await users.create_credential(session, users.ApiKey, user.id, "k")
        first, second = (budgets.KeyBudgets(engine) for engine in engines)
        other = budgets.MONTH if binding == budgets.DAY else budgets.DAY
        caps = {binding: 10_000, other: 15_000}
        spent = 0
        for n in range(40):  # worst case 700 each, real cost 400: alternate processes until refused
            owner = (first, second)[n % 2]
            try:
                hold = await owner.reserve(row.id, caps, 700)
            except budgets.CapReached as exc:
                assert exc.period == binding and exc.cap == 10_000
                break
            owner.finish(hold, 400)
            spent += 400
        else:
            raise AssertionError("the cap never bit")
        assert 10_000 - 2 * 700 - 2 * 500 <= spent <= 10_000  # each may strand less than a chunk (500) unused
        for owner in (first, second):
            await owner.flush(everything=True)  # idle: the unused rest goes back
        async with engines[0].connect() as conn:
            leased = (await conn.execute(select(KeyBudgetRow.leased).where(KeyBudgetRow.key_id == row.id))).scalars()
            assert sorted(leased) == [spent, spent]  # the day's and the month's rows count what was spent
        hold = await first.reserve(row.id, {binding: 10_000}, 10_000 - spent)  # the rest, to the last nano
        assert hold.amount == 10_000 - spent
        with pytest.raises(budgets.CapReached):
            await second.reserve(row.id, {binding: 10_000}, 1)
    finally:
        for engine in engines:
            await engine.dispose()


def test_a_daily_cap_over_two_coordinators_is_never_passed(tmp_path: Path, pg_url: str) -> None:
    """Two coordinator processes on one PostgreSQL database, each with its own agent; one key with a
    daily cap, requests alternating between them until the cap refuses them."""
    a = Pool(tmp_path, db_url=pg_url)
    a.start()
    port = localpool.free_port()
    b = localpool.start_coordinator(port, a.env, tmp_path, name="coordinator-b")
    urls = [a.url, f"http://127.0.0.1:{port}"]
    try:
        a.agent(a.standin(), [SLUG], max_concurrency=8)
        a.agent(a.standin(), [SLUG], coordinator=urls[1], wait=False, max_concurrency=8)
        eventually(lambda: httpx.get(f"{urls[1]}/healthz", timeout=5).json()["agents"] == 1, timeout=15)
        statuses, refusals, remaining = [], [], []
        cap_usd = "0.0001"
        policy = f'{{"spendCap": {{"day": {cap_usd}}}, "project": "capped"}}'
        key_id = asyncio.run(key_id_of(pg_url, a.key))
        localpool.admin(a.env, "set-key-policy", "--key-id", str(key_id), "--policy", policy)
        headers = {"authorization": f"Bearer {a.key}"}
        body = {"model": SLUG, "messages": MSG, "max_tokens": 16}
        for n in range(120):
            response = httpx.post(f"{urls[n % 2]}/v1/chat/completions", json=body, headers=headers, timeout=30)
            statuses.append(response.status_code)
            if response.status_code == 200:
                remaining.append(float(response.headers["x-pool-budget-remaining-day"]))
            else:
                refusals.append(response.json()["error"])
            if len(refusals) >= 6:
                break
        assert statuses.count(200) >= 5 and refusals, statuses
        assert all(e["code"] == "policy_blocked" and "spendCap.day" in e["message"] for e in refusals), refusals
        assert all(0 <= left <= 0.0001 for left in remaining), remaining  # USD left today, as a process knows it
        spent = asyncio.run(_spent(pg_url))
        assert 0 < spent <= 100_000, spent  # nano-USD: never past the cap
        print(f"\ndaily cap $0.0001 over 2 coordinators: {statuses.count(200)} served, spent {spent} nano-USD")
    finally:
        b.stop()
        a.stop()


async def _spent(url: str) -> int:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    try:
        for _ in range(50):  # the request log is written in batches
            count = await conn.fetchval("SELECT count(*) FROM request_log WHERE project = 'capped' AND status = 200")
            if count:
                break
            await asyncio.sleep(0.2)
        return int(await conn.fetchval("SELECT coalesce(sum(cost), 0) FROM request_log WHERE project = 'capped'"))
    finally:
        await conn.close()
