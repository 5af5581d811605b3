"""The open price board through real coordinator and agent processes (stand-in backends), on SQLite
and on PostgreSQL: providers' public profiles and slugs (in the list, the detail, and routing
preferences), every live price with its arithmetic, candles from a scripted sequence of offers
(open, high, low, close and gaps exactly), model comparison and its errors, ``x_pool``'s routing
metadata, the view cache under 1,000 concurrent requests, and the per-address and per-key limits."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from coordinator.core import db
from coordinator.market.registry import ConnectedAgent
from coordinator.status import offerlog
from coordinator.status.offerlog import OfferLog
from scripts import localpool
from shared.protocol import ModelOffer
from tests.harness import Pool, with_upstream
from tests.waiting import eventually

SMOL, GEMMA = "smollm2-135m", "gemma-3-270m"
SCRIPTED, DAILY = "mistral-7b", "qwen2.5-coder-7b"  # models no agent of these tests serves
PASSWORD = "correct horse battery staple"
CACHE_SECONDS = 2.0


@dataclass
class Provider:
    user_id: int
    portal: dict[str, str]
    token: str


@dataclass
class Board:
    pool: Pool
    providers: dict[str, Provider]


def _query(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows from the pool's database, SQLite or PostgreSQL."""

    async def read() -> list[tuple[Any, ...]]:
        engine = db.create_engine(url)
        try:
            async with engine.connect() as conn:
                return [tuple(row) for row in (await conn.execute(text(sql), params)).all()]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _provider(pool: Pool, name: str) -> Provider:
    """A provider who signed up, with a portal session and an agent token made through the API."""
    login = pool.sign_up(f"{name}@providers.example", PASSWORD)
    portal = {"authorization": f"Bearer {login['token']}"}
    made = httpx.post(f"{pool.url}/v1/agent-tokens", json={"displayName": name}, headers=portal, timeout=10)
    assert made.status_code == 201, made.text
    user_id = _query(pool.db_url, "SELECT id FROM users WHERE email = :email", email=f"{name}@providers.example")[0][0]
    return Provider(int(user_id), portal, made.json()["token"])


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def board(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    """Three providers: alpha and gamma offer SmolLM2, beta offers SmolLM2 and Gemma 3; the
    platform upstream serves SmolLM2 too."""
    workdir = tmp_path_factory.mktemp(f"board-{request.param}")
    settings: dict[str, str] = {"public_cache_seconds": str(CACHE_SECONDS)}
    if request.param == "postgresql":
        settings["database_url"] = request.getfixturevalue("own_database")
    pool = with_upstream(workdir, f"{SMOL}=upstream-smol", **settings)
    if request.param == "postgresql":
        pool.db_url = settings["database_url"]
        pool.env = localpool.coordinator_env(pool.db_url, **pool.settings)
    pool.start()
    try:
        providers = {name: _provider(pool, name) for name in ("alpha", "beta", "gamma")}
        backend = pool.standin()
        for name, models, price_in, price_out in (
            ("alpha", [SMOL], "0.1", "0.2"),
            ("beta", [SMOL, GEMMA], "0.2", "0.1"),
            ("gamma", [SMOL], "0.3", "0.6"),
        ):  # started together, then awaited together
            token = providers[name].token
            pool.agent(backend, models, wait=False, token=token, price_in=price_in, price_out=price_out)
        pool.wait_agent_count(3)
        yield Board(pool, providers)
    finally:
        pool.stop()


def _get(board: Board, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{board.pool.url}{path}", params=params, timeout=30)


def _ok(board: Board, path: str, **params: Any) -> Any:
    response = _get(board, path, **params)
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


def _blended(price_in: str, price_out: str) -> float:
    return float((3 * Decimal(price_in) + Decimal(price_out)) / 4)


def _put_profile(board: Board, who: str, **fields: str) -> httpx.Response:
    return httpx.put(
        f"{board.pool.url}/v1/provider/profile", json=fields, headers=board.providers[who].portal, timeout=10
    )


def test_providers_choose_a_public_face_and_are_listed(board: Board) -> None:
    alpha = board.providers["alpha"]
    mine = httpx.get(f"{board.pool.url}/v1/provider/profile", headers=alpha.portal, timeout=10).json()
    assert (mine["slug"], mine["name"]) == (f"provider-{alpha.user_id}", f"Provider {alpha.user_id}")  # never the email
    changed = _put_profile(
        board, "alpha", slug="alpha-gpu", name="Alpha GPU", website="https://alpha.example", description="Two 4090s."
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["slug"] == "alpha-gpu"
    assert _put_profile(board, "beta", slug="beta", name="Beta").status_code == 200
    assert _put_profile(board, "gamma", slug="gamma", name="Gamma").status_code == 200
    # taken or reserved slugs and names, and malformed fields, are refused naming the field
    _error(_put_profile(board, "beta", slug="alpha-gpu"), 409, "conflict", "slug")
    _error(_put_profile(board, "beta", slug=f"provider-{alpha.user_id}"), 400, "invalid_request", "slug")  # reserved
    _error(_put_profile(board, "beta", name="alpha  gpu!"), 409, "conflict", "name")
    _error(_put_profile(board, "beta", slug="Not A Slug"), 400, "invalid_request", "slug")
    _error(_put_profile(board, "beta", slug="12345"), 400, "invalid_request", "slug")  # would read as an id
    _error(_put_profile(board, "beta", website="javascript:alert(1)"), 400, "invalid_request", "website")
    _error(_put_profile(board, "beta", description="x" * 501), 400, "invalid_request", "description")
    anonymous = httpx.put(f"{board.pool.url}/v1/provider/profile", json={"name": "Nobody"}, timeout=10)
    assert anonymous.status_code == 401
    consumer = board.pool.sign_up(f"consumer-{board.pool.port}@example.com", PASSWORD)  # no agent token
    headers = {"authorization": f"Bearer {consumer['token']}"}
    refused = httpx.put(f"{board.pool.url}/v1/provider/profile", json={"name": "Squatter"}, headers=headers, timeout=10)
    _error(refused, 409, "conflict")
    # five slugs at most, ever (each stays the provider's): nobody hoards names
    for n in range(3):
        assert _put_profile(board, "alpha", slug=f"alpha-{n}").status_code == 200
    _error(_put_profile(board, "alpha", slug="alpha-3"), 409, "conflict", "slug")
    assert _put_profile(board, "alpha", slug="alpha-gpu").json()["slug"] == "alpha-gpu"  # back to one of its own

    listed = _ok(board, "/v1/providers")["data"]
    by_slug = {entry["slug"]: entry for entry in listed}
    assert {"alpha-gpu", "beta", "gamma"} <= set(by_slug), listed
    entry = by_slug["alpha-gpu"]
    assert entry["name"] == "Alpha GPU" and entry["website"] == "https://alpha.example"
    assert entry["status"] == "live" and entry["models"] == [SMOL]
    assert by_slug["beta"]["models"] == [GEMMA, SMOL]
    assert 0 <= entry["trust"] <= 100
    assert entry["uptime_24h"] is not None and 0.5 <= entry["uptime_24h"] <= 1.0  # connected since it joined
    assert entry["uptime_7d"] is not None and entry["joined_at"].endswith("Z")

    detail = _ok(board, "/v1/providers/alpha-gpu")
    assert detail["slug"] == "alpha-gpu" and [o["model"] for o in detail["offers"]] == [SMOL]
    assert detail["offers"][0]["input_per_1m"] == 0.1 and detail["offers"][0]["output_per_1m"] == 0.2
    # an old slug still names its provider, and can never be taken by another
    assert _ok(board, f"/v1/providers/provider-{alpha.user_id}")["slug"] == "alpha-gpu"
    _error(_get(board, "/v1/providers/nobody-here"), 404, "not_found")


def _x_pool(reply: Any) -> dict[str, Any]:
    return dict((reply.model_extra or {})["x_pool"])


def test_slugs_route_requests_and_x_pool_says_who_and_at_what_price(board: Board) -> None:
    eventually(lambda: _ok(board, "/v1/providers/alpha-gpu")["slug"] == "alpha-gpu", timeout=15)  # after the first test
    client = openai.OpenAI(base_url=f"{board.pool.url}/v1", api_key=board.pool.key, max_retries=0)
    alpha, beta = board.providers["alpha"], board.providers["beta"]
    messages: Any = [{"role": "user", "content": "hi"}]

    def ask(**provider: Any) -> dict[str, Any]:
        reply = client.chat.completions.create(model=SMOL, messages=messages, extra_body={"provider": provider})
        return _x_pool(reply)

    only = ask(only=["alpha-gpu"])
    assert (only["provider"], only["provider_slug"], only["provider_name"]) == (alpha.user_id, "alpha-gpu", "Alpha GPU")
    assert only["price_per_1m"] == {"input": 0.1, "output": 0.2} and only["routed_by"] == "balanced"
    old = ask(only=[f"provider-{alpha.user_id}"], allow_fallbacks=False)  # the old slug routes to the same provider
    assert old["provider"] == alpha.user_id
    ordered = ask(order=["beta", "alpha-gpu"])
    assert ordered["provider_slug"] == "beta" and ordered["routed_by"] == "order"
    assert ordered["price_per_1m"] == {"input": 0.2, "output": 0.1}
    cheapest = ask(sort="price", ignore=["alpha-gpu"])
    assert cheapest["provider"] == beta.user_id and cheapest["routed_by"] == "price"
    upstream = ask(only=["platform"])
    assert upstream["provider"] == "platform" and upstream["provider_slug"] == "platform" and upstream["fallback"]
    with pytest.raises(openai.APIStatusError) as refused:
        ask(only=["no-such-provider"], allow_fallbacks=False)
    assert refused.value.status_code == 503


def test_every_live_price_and_its_arithmetic(board: Board) -> None:
    prices = _ok(board, "/v1/prices", model=SMOL)
    assert "3" in prices["blend"] and "/ 4" in prices["blend"]
    offers = prices["data"]
    expected = {("0.1", "0.2"), ("0.2", "0.1"), ("0.3", "0.6")}
    assert {(str(o["input_per_1m"]), str(o["output_per_1m"])) for o in offers} == expected
    for offer in offers:
        assert offer["model"] == SMOL and offer["status"] == "live" and offer["agents"] == 1
        assert offer["blended_per_1m"] == _blended(str(offer["input_per_1m"]), str(offer["output_per_1m"]))
        assert offer["context_window"] == 8192 and offer["quantization"]
        assert abs(datetime.fromisoformat(offer["updated_at"]).timestamp() - time.time()) < 3600
    assert [o["blended_per_1m"] for o in offers] == sorted(o["blended_per_1m"] for o in offers)  # cheapest first
    assert offers[0]["blended_per_1m"] == 0.125  # alpha: (3 * 0.1 + 0.2) / 4
    beta_only = _ok(board, "/v1/prices", provider="beta")["data"]
    assert {o["model"] for o in beta_only} == {SMOL, GEMMA}
    assert next(o for o in beta_only if o["model"] == GEMMA)["blended_per_1m"] == 0.175
    everything = _ok(board, "/v1/prices")["data"]
    assert len(everything) == 4
    _error(_get(board, "/v1/prices", model="no-such-model"), 404, "model_not_found", "model")
    _error(_get(board, "/v1/prices", provider="no-such-provider"), 404, "not_found", "provider")

    models = {m["id"]: m for m in _ok(board, "/v1/models")["data"]}
    smol = models[SMOL]
    assert smol["minBlendedPricePer1mTokensUsd"] == 0.125
    assert smol["minPricePer1mTokensUsd"] == 0.3  # input + output, the field as it was
    assert (smol["parameterCount"], smol["parameterCountExact"]) == ("135M", 135_000_000)
    assert models["auto"]["minBlendedPricePer1mTokensUsd"] == 0.125


Scripted = tuple[str, int, int, int, float, float | None]  # agent, provider, price in, out, from, to (hours)


async def _script(url: str, model: str, base: float, offers: list[Scripted]) -> None:
    """Offers of ``model`` at chosen times (hours after ``base``), recorded as a coordinator records
    its agents' (``OfferLog``); the ones still open belong to a live process (renewed just now)."""
    engine = db.create_engine(url)
    log = OfferLog(engine, f"crd_script_{model}", retention_days=90, lease_seconds=10**9)

    def at(hours: float) -> datetime:
        return datetime.fromtimestamp(base + hours * 3600, UTC)

    events: list[tuple[float, bool, ConnectedAgent]] = []
    for agent_id, user_id, price_in, price_out, start, end in offers:
        offer = ModelOffer(model, model, price_in, price_out, 32768, "q4_k_m")
        agent = ConnectedAgent(agent_id, user_id, 0, {model: offer}, 1, None, 0.0)  # type: ignore[arg-type]
        events.append((start, True, agent))
        if end is not None:
            events.append((end, False, agent))
    for hours, opened, agent in sorted(events, key=lambda e: e[0]):
        (log.opened if opened else log.ended)(agent, at(hours))
    try:
        await log.flush()
        await log.sweep()
    finally:
        await engine.dispose()


def test_candles_from_a_scripted_sequence_of_offers(board: Board) -> None:
    now = time.time()
    base = math.floor(now / 3600) * 3600 - 10 * 3600  # ten whole hours ago
    alpha, beta = board.providers["alpha"], board.providers["beta"]
    script: list[Scripted] = [
        ("agt_script_a", alpha.user_id, 100, 200, 0, 2.5),  # blended (300 + 200) / 4 nano per token: $0.125 per 1M
        ("agt_script_b", beta.user_id, 80, 80, 1.25, 1.75),  # $0.08 for half an hour
        ("agt_script_c", alpha.user_id, 200, 400, 4.5, None),  # $0.25 from 4:30, still offered
    ]
    asyncio.run(_script(board.pool.db_url, SCRIPTED, base, script))

    history = _ok(board, "/v1/history", model=SCRIPTED, days=1, interval="1h")
    assert (history["model"], history["provider"], history["interval"], history["days"]) == (SCRIPTED, None, "1h", 1)
    candles = {c["time"]: c for c in history["candles"]}
    times = sorted(candles)
    assert times == list(range(times[0], times[-1] + 1, 3600)) and times[-1] <= now < times[-1] + 3600
    assert times[0] <= now - 86_400

    def ohlc(hour: int) -> tuple[Any, ...]:
        c = candles[int(base) + hour * 3600]
        return c["open"], c["high"], c["low"], c["close"], c["change_pct"]

    assert ohlc(-1) == (None, None, None, None, None)  # before any offer: a gap, not a zero
    assert ohlc(0) == (0.125, 0.125, 0.125, 0.125, 0.0)
    assert ohlc(1) == (0.125, 0.125, 0.08, 0.125, 0.0)  # b undercut for half an hour
    assert ohlc(2) == (0.125, 0.125, 0.125, 0.125, 0.0)  # offers ended at 2:30
    assert ohlc(3) == (None, None, None, None, None)  # nobody offered it
    assert ohlc(4) == (0.25, 0.25, 0.25, 0.25, 0.0)  # offered again from 4:30
    assert all(ohlc(h)[3] == 0.25 for h in range(5, 10))
    before = [c for t, c in candles.items() if t < base]
    assert before and all(c["open"] is None for c in before)

    # one provider's own price: beta's only offer was the half hour at $0.08
    beta_history = _ok(board, "/v1/history", model=SCRIPTED, provider="beta", days=1)
    by_time = {c["time"]: c for c in beta_history["candles"]}
    assert beta_history["provider"] == "beta"
    assert (by_time[int(base) + 3600]["open"], by_time[int(base) + 3600]["close"]) == (0.08, 0.08)
    assert by_time[int(base)]["open"] is None and by_time[int(base) + 2 * 3600]["open"] is None

    # daily candles: yesterday $0.125 with an hour at $0.08, today $0.25 from midnight, before that nothing
    today = math.floor(now / 86_400) * 86_400
    daily_script: list[Scripted] = [
        ("agt_daily_a", alpha.user_id, 100, 200, -22, -19),
        ("agt_daily_b", beta.user_id, 80, 80, -21, -20),
        ("agt_daily_c", beta.user_id, 200, 400, 0, None),
    ]
    asyncio.run(_script(board.pool.db_url, DAILY, today, daily_script))
    daily = _ok(board, "/v1/history", model=DAILY, interval="1d", days=3)["candles"]
    assert [c["time"] for c in daily] == [today - 3 * 86_400, today - 2 * 86_400, today - 86_400, today]
    assert [ohlc for c in daily[:2] for ohlc in (c["open"], c["close"])] == [None] * 4
    assert (daily[2]["open"], daily[2]["high"], daily[2]["low"], daily[2]["close"]) == (0.125, 0.125, 0.08, 0.125)
    assert (daily[3]["open"], daily[3]["high"], daily[3]["low"], daily[3]["close"]) == (0.25, 0.25, 0.25, 0.25)
    assert daily[2]["change_pct"] == daily[3]["change_pct"] == 0.0

    _error(_get(board, "/v1/history"), 400, "invalid_request", "model")
    _error(_get(board, "/v1/history", model="no-such-model"), 404, "model_not_found", "model")
    _error(_get(board, "/v1/history", model=SCRIPTED, interval="5m"), 400, "invalid_request", "interval")
    _error(_get(board, "/v1/history", model=SCRIPTED, days=0), 400, "invalid_request", "days")
    _error(_get(board, "/v1/history", model=SCRIPTED, days=91), 400, "invalid_request", "days")
    _error(_get(board, "/v1/history", model=SCRIPTED, provider="nobody"), 404, "not_found", "provider")


def test_compare_one_and_five_models_and_its_errors(board: Board) -> None:
    one = _ok(board, "/v1/compare", models=SMOL)["data"]
    assert len(one) == 1
    row = one[0]
    assert row["model"] == SMOL and row["provider_count"] == 3 and row["fallback_available"] is True
    assert (row["cheapest_provider"], row["cheapest_blended_per_1m"]) == ("alpha-gpu", 0.125)
    assert row["average_blended_per_1m"] == round((0.125 + 0.175 + _blended("0.3", "0.6")) / 3, 6)
    assert row["context_window"] == 8192 and "p95_latency_ms" in row
    five = [SMOL, GEMMA, "gemma-3-270m-it", "qwen2.5-7b", "llama-3.1-8b"]
    rows = _ok(board, "/v1/compare", models=",".join(five))["data"]
    assert [r["model"] for r in rows] == five
    gemma = rows[1]
    assert (gemma["cheapest_provider"], gemma["provider_count"], gemma["fallback_available"]) == ("beta", 1, False)
    nobody = rows[3]
    assert nobody["provider_count"] == 0 and nobody["cheapest_blended_per_1m"] is None
    assert nobody["context_window"] == 32768
    _error(_get(board, "/v1/compare", models=",".join([*five, "mistral-7b"])), 400, "invalid_request", "models")
    _error(_get(board, "/v1/compare", models=f"{SMOL},no-such-model"), 404, "model_not_found", "models")
    _error(_get(board, "/v1/compare"), 400, "invalid_request", "models")
    assert len(_ok(board, "/v1/compare", models=f"{SMOL},{SMOL}")["data"]) == 1  # repeats count once


def _computed(url: str, view: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf'^pool_public_views_computed_total{{view="{view}"}} (\S+)$', metrics, re.M)
    return float(found[1]) if found else 0.0


async def _flood(url: str, n: int) -> list[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        replies = await asyncio.gather(*(client.get(f"{url}/v1/pool/status") for _ in range(n)))
    return [r.status_code for r in replies]


@pytest.mark.parametrize("board", ["sqlite"], indirect=True)  # the cache is in memory: once is enough
def test_a_thousand_concurrent_status_requests_cost_one_computation_per_interval(board: Board) -> None:
    url = board.pool.url
    before = _computed(url, "status")
    started = time.monotonic()
    statuses = asyncio.run(_flood(url, 1000))
    elapsed = time.monotonic() - started
    computed = _computed(url, "status") - before
    assert statuses.count(200) == 1000, statuses
    assert 0 <= computed <= math.ceil(elapsed / CACHE_SECONDS) + 1, (computed, elapsed)
    print(f"\n1,000 concurrent /v1/pool/status in {elapsed:.2f} s: {computed:.0f} computation(s)")


@pytest.mark.parametrize("board", ["sqlite"], indirect=True)  # the limits are in memory: once is enough
def test_public_routes_are_limited_per_address_and_keys_get_more(board: Board, tmp_path: Any) -> None:
    """A second coordinator on the same database, with small limits."""
    port = localpool.free_port()
    env = {**board.pool.env, "POOL_PUBLIC_RPM": "5", "POOL_PUBLIC_RPM_KEYED": "12"}
    proc = localpool.start_coordinator(port, env, tmp_path, name="limited")
    url = f"http://127.0.0.1:{port}"
    try:
        paths = ["/v1/models", "/v1/pool/status", "/v1/prices", "/v1/providers", "/v1/compare?models=smollm2-135m"]
        anonymous = [httpx.get(f"{url}{paths[n % len(paths)]}", timeout=10) for n in range(5)]
        assert [r.status_code for r in anonymous] == [200] * 5
        refused = httpx.get(f"{url}/status", timeout=10)
        _error(refused, 429, "rate_limit_exceeded")
        assert int(refused.headers["retry-after"]) >= 1
        keyed = {"authorization": f"Bearer {board.pool.key}"}
        with_key = [httpx.get(f"{url}/v1/models", headers=keyed, timeout=10).status_code for _ in range(13)]
        assert with_key == [200] * 12 + [429], with_key
        # a made-up key is no key: it counts against the address, which is out of requests
        forged = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer pool_live_forged"}, timeout=10)
        _error(forged, 429, "rate_limit_exceeded")
    finally:
        proc.stop()


def test_offer_spans_follow_agents(board: Board) -> None:
    """Real agents' offers are on record: open while connected, ended when an agent leaves."""
    pool = board.pool
    gamma = board.providers["gamma"]

    def spans() -> list[tuple[Any, ...]]:
        sql = "SELECT model, price_in, price_out, ended_at FROM offer_spans WHERE user_id = :user_id"
        return _query(pool.db_url, sql, user_id=gamma.user_id)

    eventually(lambda: len(spans()) == 1, timeout=10)
    assert spans()[0][:3] == (SMOL, 300, 600) and spans()[0][3] is None
    extra = pool.agent(pool.standin(), [GEMMA], token=gamma.token, price_in="0.4", price_out="0.4")
    eventually(lambda: len(spans()) == 2, timeout=10)
    extra.stop()
    eventually(lambda: any(row[0] == GEMMA and row[3] is not None for row in spans()), timeout=15)


def test_the_openapi_schema_documents_the_board(board: Board) -> None:
    schema = _ok(board, "/schema/openapi.json")
    paths = schema["paths"]
    for path in ("/v1/providers", "/v1/providers/{slug}", "/v1/prices", "/v1/history", "/v1/compare"):
        assert "get" in paths[path], path
    assert {"get", "put"} <= set(paths["/v1/provider/profile"])
    assert {p["name"] for p in paths["/v1/history"]["get"]["parameters"]} >= {"model", "provider", "days", "interval"}
    components = schema["components"]["schemas"]

    def fields(name: str) -> set[str]:
        (found,) = [v for k, v in components.items() if k.split("_")[-1] == name or k == name]
        return set(found["properties"])

    assert fields("PriceOffer") >= {"input_per_1m", "output_per_1m", "blended_per_1m", "status", "updated_at"}
    assert fields("Candle") == {"time", "open", "high", "low", "close", "change_pct"}
    assert fields("ProviderEntry") >= {"slug", "name", "models", "status", "trust", "uptime_24h", "uptime_7d"}
    assert fields("ModelComparison") >= {"cheapest_provider", "average_blended_per_1m", "p95_latency_ms"}
    assert fields("ModelEntry") >= {"parameterCount", "parameterCountExact", "minBlendedPricePer1mTokensUsd"}


async def test_the_offer_log_continues_a_returning_offer_and_drops_only_a_refused_change(db_url: str) -> None:
    """Also: a database lost while changes go one by one keeps the rest queued."""
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        log = OfferLog(engine, "crd_a", retention_days=90, lease_seconds=10**9)  # alive however old its spans
        base = datetime(2026, 12, 1, tzinfo=UTC)

        def agent(agent_id: str, price_in: int | None = 100) -> ConnectedAgent:
            offer = ModelOffer(SMOL, SMOL, price_in, 200, None, "q4_k_m")  # type: ignore[arg-type]
            return ConnectedAgent(agent_id, 1, 0, {SMOL: offer}, 1, None, 0.0)  # type: ignore[arg-type]

        first, again, later, broken = agent("agt_1"), agent("agt_2"), agent("agt_3"), agent("agt_bad", None)
        log.opened(first, base)
        log.ended(first, base + timedelta(seconds=30))
        log.opened(again, base + timedelta(seconds=50))  # back within a minute, same offer: the same span
        log.opened(broken, base + timedelta(seconds=55))  # a change the database refuses (no price)
        log.ended(again, base + timedelta(seconds=70))
        log.opened(later, base + timedelta(seconds=200))  # back after two minutes: a new span
        await log.flush()
        spans = sorted(await log.spans(base - timedelta(hours=1), base + timedelta(hours=1)), key=lambda s: s.start)
        assert [(s.agent_id, s.start - base, None if s.end is None else s.end - base) for s in spans] == [
            ("agt_2", timedelta(0), timedelta(seconds=70)),
            ("agt_3", timedelta(seconds=200), None),
        ]
        await log.flush()  # nothing was left queued: the refused change was dropped alone
        assert not log._queue

        # The database goes away while changes are written one by one (after one it refused): the
        # change at hand and those after it wait for it, none is dropped as refused.
        log.opened(agent("agt_bad2", None), base + timedelta(seconds=300))  # refused: one by one from here
        log.opened(agent("agt_4"), base + timedelta(seconds=310))
        log.opened(agent("agt_5"), base + timedelta(seconds=320))
        write, calls = offerlog._write, []

        async def away_once(conn: Any, event: Any) -> None:  # the fault: a connection lost mid-loop
            calls.append(event)
            if len(calls) == 3:  # the batch's, then agt_bad2 alone, then agt_4's: the database is gone
                raise OperationalError("INSERT", {}, ConnectionError("connection lost"))
            await write(conn, event)

        offerlog._write = away_once  # type: ignore[assignment]
        try:
            with pytest.raises(OperationalError):
                await log.flush()
        finally:
            offerlog._write = write  # type: ignore[assignment]
        assert len(log._queue) == 2  # agt_4's and agt_5's, in order
        await log.flush()
        spans = await log.spans(base, base + timedelta(hours=1))
        assert {"agt_4", "agt_5"} <= {s.agent_id for s in spans}
    finally:
        await engine.dispose()
