"""Money end to end with the real model (llama.cpp + SmolLM2), real coordinator and agent processes.

Prices make the arithmetic exact: input is free and output costs 1 USD per 1M tokens (1000 nano-USD
per token), and a `logit_bias` that bans SmolLM2's end tokens makes every completion exactly
`max_tokens` long, so a served request costs exactly its hold.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core import db
from coordinator.money import ledger
from tests.harness import CONSUMER, Pool
from tests.ledger_checks import balance, ledger_problems, pending_holds
from tests.waiting import eventually

SLUG = "smollm2-135m"
PRICE_OUT_NANO = 1_000  # --price-out 1 (USD per 1M tokens)
FEE_BPS = 1_000  # the default platform fee, 10%


# SmolLM2's <|endoftext|>, <|im_start|> and <|im_end|>: banned, the model never ends before its limit.
# (`ignore_eos` would too, but it is llama.cpp's own field, which the pool does not forward.)
NO_END = {"0": -100, "1": -100, "2": -100}


def body(max_tokens: int, stream: bool = False) -> bytes:
    return json.dumps(
        {
            "model": SLUG,
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": max_tokens,
            "logit_bias": NO_END,
            "stream": stream,
        }
    ).encode()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def with_engine(url: str, action):  # type: ignore[no-untyped-def]
    engine = db.create_engine(url)
    try:
        return await action(engine)
    finally:
        await engine.dispose()


def wait_settled(url: str, timeout: float = 20.0) -> None:
    """Wait until no hold is pending (settlement runs in the background, the sweep after a crash)."""
    eventually(lambda: run(with_engine(url, pending_holds)) == 0, timeout, interval=0.2)


def user_id(url: str, email: str) -> int:
    async def find(engine: AsyncEngine) -> int:
        async with engine.connect() as conn:
            return int(await conn.scalar(text("SELECT id FROM users WHERE email = :e"), {"e": email}))

    return int(run(with_engine(url, find)))


def books(url: str, consumer: int, provider: int) -> tuple[int, int, int, list[str]]:
    async def read(engine: AsyncEngine) -> tuple[int, int, int, list[str]]:
        return (
            await balance(engine, ledger.wallet(consumer)),
            await balance(engine, ledger.held(consumer)),
            await balance(engine, ledger.escrow(provider)),  # earnings stay in escrow for the hold period
            await ledger_problems(engine),
        )

    return run(with_engine(url, read))  # type: ignore[no-any-return]


def generation(pool: Pool, request_id: str) -> dict[str, object]:
    reply = httpx.get(
        f"{pool.url}/v1/generation/{request_id}", headers={"authorization": f"Bearer {pool.key}"}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def start_pool(workdir: Path, db_url: str, llama: str, **settings: str) -> Pool:
    pool = Pool(workdir, db_url=db_url, credits_usd="", rate_limit_rpm="100000", **settings)
    pool.start()
    pool.agent(llama, [SLUG], price_in="0", price_out="1", max_concurrency=16)
    return pool


def test_exactly_the_covered_requests_are_served(db_url: str, llama: str, tmp_path: Path) -> None:
    """100 concurrent requests against credits for exactly 10 holds: 10 served, 90 refused with 402."""
    max_tokens = 6
    hold = max_tokens * PRICE_OUT_NANO  # input is free, so the prompt's bound adds nothing
    pool = start_pool(tmp_path, db_url, llama)
    try:
        pool.grant(CONSUMER, f"{10 * hold / 1e9:.9f}")
        payload = body(max_tokens)

        async def fire() -> list[httpx.Response]:
            headers = {"authorization": f"Bearer {pool.key}", "content-type": "application/json"}
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                url = f"{pool.url}/v1/chat/completions"
                return list(
                    await asyncio.gather(*(client.post(url, content=payload, headers=headers) for _ in range(100)))
                )

        replies = run(fire())
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) == 10 and statuses.count(402) == 90, statuses
        assert all(r.json()["error"]["code"] == "insufficient_credits" for r in replies if r.status_code == 402)
        served = [r.json() for r in replies if r.status_code == 200]
        assert all(s["usage"]["completion_tokens"] == max_tokens for s in served)
        assert all(s["x_pool"]["cost_usd"] == pytest.approx(hold / 1e9) for s in served)
        wait_settled(db_url)
        consumer, provider = user_id(db_url, CONSUMER), user_id(db_url, "provider@example.com")
        wallet, held, earned, problems = books(db_url, consumer, provider)
        assert (wallet, held, problems) == (0, 0, [])
        assert earned == 10 * ledger.provider_share(hold, FEE_BPS)
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def cut_pool(tmp_path_factory: pytest.TempPathFactory, llama: str) -> Iterator[Pool]:
    workdir = tmp_path_factory.mktemp("cut")
    pool = Pool(
        workdir,
        credits_usd="10",
        rate_limit_rpm="100000",
        instance_lease_seconds="2",
        hold_sweep_interval="0.5",
    )
    pool.start()
    pool.extra["llama"] = llama
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(autouse=True)
def _stop_cut_agents(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "cut_pool" in request.fixturenames:
        request.getfixturevalue("cut_pool").stop_agents()


def read_stream(pool: Pool, max_tokens: int, stop_after: int | None, on_chunk=None):  # type: ignore[no-untyped-def]
    """Stream a request; count the text deltas received. Stops reading (closing the connection) after
    ``stop_after`` deltas; ``on_chunk(n)`` runs after each delta. Returns (request id, deltas, events)."""
    received, events = 0, []
    headers = {"authorization": f"Bearer {pool.key}", "content-type": "application/json"}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{pool.url}/v1/chat/completions", content=body(max_tokens, True), headers=headers) as r,
    ):
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            events.append(event)
            choices = event.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                received += 1
                if on_chunk is not None:
                    on_chunk(received)
                if stop_after is not None and received >= stop_after:
                    break
    return request_id, received, events


def test_stream_cut_by_the_consumer_bills_what_was_delivered(cut_pool: Pool) -> None:
    pool = cut_pool
    pool.agent(pool.extra["llama"], [SLUG], price_in="0", price_out="1")
    request_id, received, _ = read_stream(pool, max_tokens=400, stop_after=5)
    wait_settled(pool.db_url)
    record = generation(pool, request_id)
    billed = int(record["completionTokens"])  # type: ignore[call-overload]
    # At least what the consumer read; far less than the 400 it asked for (it left after 5).
    assert received <= billed <= 60, (received, billed)
    assert record["costNano"] == billed * PRICE_OUT_NANO
    assert record["status"] == 499
    assert run(with_engine(pool.db_url, ledger_problems)) == []


def test_stream_cut_by_the_agent_bills_exactly_what_was_delivered(cut_pool: Pool) -> None:
    pool = cut_pool
    agent = pool.agent(pool.extra["llama"], [SLUG], price_in="0", price_out="1")
    provider = user_id(pool.db_url, "provider@example.com")
    earned_before = books(pool.db_url, user_id(pool.db_url, CONSUMER), provider)[2]

    def kill_agent(n: int) -> None:
        if n == 5:
            agent.popen.send_signal(signal.SIGKILL)

    request_id, received, events = read_stream(pool, max_tokens=400, stop_after=None, on_chunk=kill_agent)
    assert events[-1].get("error", {}).get("code") == "provider_error"
    wait_settled(pool.db_url)
    record = generation(pool, request_id)
    assert record["completionTokens"] == received and 5 <= received < 400
    assert record["costNano"] == received * PRICE_OUT_NANO
    consumer = user_id(pool.db_url, CONSUMER)
    earned = books(pool.db_url, consumer, provider)[2] - earned_before
    assert earned == ledger.provider_share(received * PRICE_OUT_NANO, FEE_BPS)
    assert run(with_engine(pool.db_url, ledger_problems)) == []


def test_coordinator_killed_mid_stream_leaves_no_hold_and_no_charge(cut_pool: Pool) -> None:
    pool = cut_pool
    pool.agent(pool.extra["llama"], [SLUG], price_in="0", price_out="1")
    consumer, provider = user_id(pool.db_url, CONSUMER), user_id(pool.db_url, "provider@example.com")
    wallet_before, _, earned_before, _ = books(pool.db_url, consumer, provider)
    assert pool.coordinator is not None

    def kill_coordinator(n: int) -> None:
        if n == 5 and pool.coordinator is not None:
            pool.coordinator.popen.send_signal(signal.SIGKILL)

    with pytest.raises(httpx.HTTPError):
        read_stream(pool, max_tokens=400, stop_after=None, on_chunk=kill_coordinator)
    assert run(with_engine(pool.db_url, pending_holds)) == 1  # the dead process's hold
    pool.restart()  # a new process: the old one's lease runs out and its sweep releases the hold
    wait_settled(pool.db_url)
    wallet, held, earned, problems = books(pool.db_url, consumer, provider)
    assert (wallet, held, earned, problems) == (wallet_before, 0, earned_before, [])
