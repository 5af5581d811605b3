"""The pool against hostile parties (issue 15): a scriptable agent that speaks the protocol
(``tests/hostile.py``) and hostile consumers, beside an honest pool-agent on the real llama.cpp
server. Each test reproduces one attack and asserts what the consumer paid, what the honest provider
earned, what evidence the attacker got, and that the books still balance. (Failed agent tokens
counted against an address: tests/integration/test_agent_link.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from coordinator.trust import scores as trust
from shared import errors
from shared.protocol import Draining, JobAssign, JobChunk, JobDone, JobFailed, Usage
from tests.harness import Pool
from tests.hostile import HostileAgent, chunk, offer, reply
from tests.ledger_checks import ledger_problems
from tests.waiting import eventually_async

SLUG = "smollm2-135m"
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory, llama: str) -> Iterator[Pool]:
    """Production trust rules (threshold 40, new agents 2 jobs at once), no canaries, and an honest
    provider's pool-agent on llama.cpp."""
    pool = Pool(
        tmp_path_factory.mktemp("arena"),
        trust_threshold="40",
        new_agent_concurrency="2",
        whole_reply_silence="2",
        idle_timeout="5",
    )
    pool.start()
    pool.agent(llama, [SLUG], price_in="0.1", price_out="0.2", max_concurrency=4)
    try:
        yield pool
    finally:
        pool.stop()


_names = iter(range(10_000))


def provider(pool: Pool) -> tuple[str, int]:
    """A new provider account and agent token; returns (token, token id)."""
    token, _ = pool.new_provider(f"hostile{next(_names)}")
    digest = hashlib.sha256(token.encode()).hexdigest()
    (token_id,) = _query(pool, "SELECT id FROM agent_tokens WHERE digest = ?", digest)[0]
    return token, int(token_id)


def consumer(pool: Pool, usd: str) -> str:
    return pool.new_consumer(f"consumer{next(_names)}@consumers.example", usd)[0]


def _query(pool: Pool, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(pool.db_url.removeprefix("sqlite+aiosqlite:///")) as db:
        return db.execute(sql, args).fetchall()


async def evidence(pool: Pool, token_id: int, kind: str, at_least: int = 1) -> list[str]:
    """The details of ``kind`` evidence stored against the token (waits for the trust writer)."""

    def stored() -> list[tuple[Any, ...]] | None:
        rows = _query(pool, "SELECT detail FROM trust_evidence WHERE agent_token_id = ? AND kind = ?", token_id, kind)
        return rows if len(rows) >= at_least else None

    return [row[0] for row in await eventually_async(stored)]


def kinds(pool: Pool, token_id: int) -> set[str]:
    return {row[0] for row in _query(pool, "SELECT kind FROM trust_evidence WHERE agent_token_id = ?", token_id)}


async def generation(pool: Pool, request_id: str, key: str | None = None) -> dict[str, Any]:
    """The request's generation record, once it has ended."""

    async def ended() -> dict[str, Any] | None:
        async with httpx.AsyncClient() as client:
            reply = await client.get(
                f"{pool.url}/v1/generation/{request_id}", headers={"authorization": f"Bearer {key or pool.key}"}
            )
        found: dict[str, Any] = reply.json() if reply.status_code == 200 else {}
        return found if found.get("status") else None

    return await eventually_async(ended)


async def earned(pool: Pool, request_id: str) -> tuple[int, int, int | None]:
    """(cost, the provider's share, the provider) of a request, from the request log."""

    def logged() -> list[tuple[Any, ...]]:
        return _query(pool, "SELECT cost, provider_earned, provider_user_id FROM request_log WHERE id = ?", request_id)

    cost, share, paid = (await eventually_async(logged))[0]
    return cost, share, paid


def provider_of(pool: Pool, token: str) -> int:
    digest = hashlib.sha256(token.encode()).hexdigest()
    return int(_query(pool, "SELECT user_id FROM agent_tokens WHERE digest = ?", digest)[0][0])


async def books_balance(pool: Pool) -> None:
    from coordinator.core import db

    engine = db.create_engine(pool.db_url)
    try:
        assert await ledger_problems(engine) == []
    finally:
        await engine.dispose()


async def chat(pool: Pool, body: dict[str, Any], key: str | None = None, timeout: float = 60) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await client.post(
            f"{pool.url}/v1/chat/completions", headers={"authorization": f"Bearer {key or pool.key}"}, json=body
        )


def only(token_id: int, pool: Pool) -> dict[str, Any]:
    """``provider.only`` naming the provider that owns ``token_id``."""
    (user_id,) = _query(pool, "SELECT user_id FROM agent_tokens WHERE id = ?", token_id)[0]
    return {"only": [int(user_id)], "allow_fallbacks": False}


# --- 1. an agent's claims bind only that agent --------------------------------------------------


async def test_a_tiny_context_window_caps_only_its_own_jobs(arena: Pool) -> None:
    token, _ = provider(arena)
    async with HostileAgent(arena.url, token, models=[offer(context_window=1)]) as agent:
        await agent.send(Draining())
        reply_ = await chat(arena, {"model": SLUG, "messages": HI, "max_tokens": 40, "temperature": 0})
        assert reply_.status_code == 200, reply_.text
        usage = reply_.json()["usage"]
        assert usage["completion_tokens"] > 1
        billed = await generation(arena, reply_.json()["x_pool"]["request_id"])
        assert billed["completionTokens"] == usage["completion_tokens"]
        assert agent.assigned == []
        cost, share, paid = await earned(arena, reply_.json()["x_pool"]["request_id"])
        assert paid == provider_of(arena, arena.token)  # the honest provider earned its full price
        assert cost == usage["prompt_tokens"] * 100 + usage["completion_tokens"] * 200
        assert share == cost * 9 // 10  # less the 10 % platform fee
        # The directory counts who can serve: not the draining agent that still announces the model.
        async with httpx.AsyncClient(timeout=5) as client:
            listing = (await client.get(f"{arena.url}/v1/models")).json()["data"]
        entry = next(m for m in listing if m["id"] == SLUG)
        assert entry["providerCount"] == 1 and entry["minPricePer1mTokensUsd"] == pytest.approx(0.3)
    await books_balance(arena)


# --- 8. prices are bounded by the directory, and one dear agent prices nobody out ----------------


async def test_prices_beyond_the_ceiling_are_refused_and_a_dear_agent_prices_nobody_out(arena: Pool) -> None:
    token, _ = provider(arena)
    for price in (10**12, 2**62):
        async with HostileAgent(arena.url, token, models=[offer(price_in=price, price_out=price)]) as agent:
            assert agent.rejected is not None and "ceiling" in agent.rejected
    # Within the ceiling but dear ($50 in, $200 out per 1M): a consumer with one cent is served by
    # the cheap honest agent instead of getting a 402.
    poor = consumer(arena, "0.01")
    async with HostileAgent(arena.url, token, models=[offer(price_in=50_000, price_out=200_000)]) as dear:
        assert dear.welcome is not None
        body = {"model": SLUG, "messages": HI, "max_tokens": 50, "temperature": 0}
        for _ in range(4):
            served = await chat(arena, body, key=poor)
            assert served.status_code == 200, served.text
            assert served.json()["x_pool"]["agent"] != dear.agent_id
        assert dear.assigned == []
    await books_balance(arena)


# --- 3. a flood of output ---------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_flood_of_output_is_cut_at_the_bound_and_stalls_nothing(arena: Pool) -> None:
    token, token_id = provider(arena)
    assert arena.coordinator is not None
    pid = arena.coordinator.popen.pid
    before = _rss_kb(pid)
    big = chunk("x" * (4 * 1024 * 1024 - 200))
    flooded = asyncio.Event()

    async def flood(agent: HostileAgent, job: JobAssign) -> None:
        for seq in range(20):
            await agent.send(JobChunk(job_id=job.job_id, seq=seq, data=big))
        flooded.set()

    health: list[float] = []

    async def probe() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while not flooded.is_set():
                started = time.perf_counter()
                assert (await client.get(f"{arena.url}/healthz")).status_code == 200
                health.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)  # a probe every 50 ms

    async with HostileAgent(arena.url, token, serve=flood) as agent:
        body = {"model": SLUG, "messages": HI, "max_tokens": 10, "stream": True, "temperature": 0}
        prober = asyncio.create_task(probe())
        received = 0
        async with (
            httpx.AsyncClient(timeout=60) as client,
            client.stream(
                "POST", f"{arena.url}/v1/chat/completions", headers={"authorization": f"Bearer {arena.key}"}, json=body
            ) as response,
        ):
            assert response.status_code == 200
            async for data in response.aiter_bytes():
                received += len(data)
        await asyncio.wait_for(flooded.wait(), 120)
        await prober
        assert agent.assigned, "the cheap hostile agent was not chosen"
        assert agent.cancelled == [agent.assigned[0].job_id]
    assert received < 20_000  # the honest agent's 10 tokens: the flood was cut before any of it reached the consumer
    assert health and max(health) < 1.0, f"/healthz took up to {max(health):.2f} s during the flood"
    grown_mb = (_rss_kb(pid) - before) / 1024
    assert grown_mb < 64, f"the coordinator grew by {grown_mb:.0f} MB"
    assert await evidence(arena, token_id, trust.OVERRAN)
    assert arena.agent_count() >= 1  # the honest agent was not dropped
    await books_balance(arena)


# --- 4, 10, 11. what the coordinator bills, it counted -----------------------------------------


async def _served_by(agent_serve: Callable[[HostileAgent, JobAssign], Awaitable[None]], arena: Pool, **body: Any):  # type: ignore[no-untyped-def]
    token, token_id = provider(arena)
    async with HostileAgent(arena.url, token, serve=agent_serve) as agent:
        request = {"model": SLUG, "messages": HI, "max_tokens": 1000, "provider": only(token_id, arena), **body}
        response = await chat(arena, request)
        assert response.status_code == 200, response.text
        assert len(agent.assigned) == 1
    return token_id, response


WORDS = ["one ", "two ", "three ", "four ", "five"]


async def test_a_tool_call_does_not_switch_off_the_usage_audit(arena: Pool) -> None:
    async def inflate(agent: HostileAgent, job: JobAssign) -> None:
        call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        payloads = [chunk(word) for word in WORDS] + [chunk(tool_calls=[call])]
        await agent.stream(job.job_id, payloads, usage=Usage(5, 10**9, 10**9 + 5), finish="tool_calls")

    token_id, response = await _served_by(inflate, arena, stream=True)
    billed = await generation(arena, response.headers["x-request-id"])
    # 5 one-token deltas, and the call: its name and arguments plus the allowance for its markers.
    assert billed["completionTokens"] <= 5 + 32 + len("f") + len("{}")
    assert billed["reportedCompletionTokens"] == 10**9
    details = await evidence(arena, token_id, trust.USAGE_INFLATED)
    assert any("completion tokens" in detail for detail in details)
    assert trust.COMPLETED not in kinds(arena, token_id)
    await books_balance(arena)


async def test_text_outside_the_choices_is_not_billed(arena: Pool) -> None:
    invisible = msgspec.json.encode({"id": "x", "choices": [], "content": "invisible", "delta": {"content": "no"}})

    async def pad(agent: HostileAgent, job: JobAssign) -> None:
        payloads = [invisible] * 206 + [chunk(word) for word in WORDS]
        await agent.stream(job.job_id, payloads, usage=Usage(5, 211, 216))

    token_id, response = await _served_by(pad, arena, stream=True)
    billed = await generation(arena, response.headers["x-request-id"])
    assert billed["completionTokens"] == 5
    assert await evidence(arena, token_id, trust.USAGE_INFLATED)
    await books_balance(arena)


async def test_inflated_prompt_tokens_are_evidence_and_billed_as_estimated(arena: Pool) -> None:
    async def inflate(agent: HostileAgent, job: JobAssign) -> None:
        await agent.send(JobDone(job_id=job.job_id, usage=Usage(10**9, 2, 10**9 + 2), tail=[reply("hi there")]))

    token_id, response = await _served_by(inflate, arena)
    billed = await generation(arena, response.json()["x_pool"]["request_id"])
    assert billed["reportedPromptTokens"] == 10**9
    assert billed["promptTokens"] == len("Say hi.") // 4 + 4  # the estimate: characters / 4 + 4 per message
    details = await evidence(arena, token_id, trust.USAGE_INFLATED)
    assert any("prompt tokens" in detail for detail in details)
    assert trust.COMPLETED not in kinds(arena, token_id)
    await books_balance(arena)


# --- 5, 12. failures are evidence unless the consumer caused them --------------------------------


async def test_an_agent_refusing_valid_requests_blocks_nobody(arena: Pool) -> None:
    token, token_id = provider(arena)

    async def refuse(agent: HostileAgent, job: JobAssign) -> None:
        await agent.send(
            JobFailed(job_id=job.job_id, code=errors.BACKEND_REJECTED, message="no", retryable=False, status=400)
        )

    async with HostileAgent(arena.url, token, serve=refuse) as agent:
        body = {"model": SLUG, "messages": HI, "max_tokens": 5, "temperature": 0}
        results = [await chat(arena, body) for _ in range(20)]
        assert [r.status_code for r in results] == [200] * 20
        assert agent.assigned, "the refusing agent was never tried"
        # each request the refuser took failed over to the honest agent: a second attempt, not an error
        attempts = sorted(r.json()["x_pool"]["attempts"] for r in results)
        assert attempts == [1] * (20 - len(agent.assigned)) + [2] * len(agent.assigned), attempts
        honest = provider_of(arena, arena.token)
        for result in results:  # every request was paid to the provider that served it, never the refuser
            assert (await earned(arena, result.json()["x_pool"]["request_id"]))[2] == honest
    details = await evidence(arena, token_id, trust.FAILED)
    assert all("another provider served" in detail for detail in details)
    await books_balance(arena)


async def test_silence_on_a_whole_reply_is_evidence_and_fails_over_fast(arena: Pool) -> None:
    token, token_id = provider(arena)

    async def ignore(agent: HostileAgent, job: JobAssign) -> None:
        return None

    async with HostileAgent(arena.url, token, serve=ignore) as agent:
        body = {"model": SLUG, "messages": HI, "max_tokens": 5, "temperature": 0}
        for _ in range(6):
            started = time.perf_counter()
            response = await chat(arena, body)
            assert response.status_code == 200, response.text
            assert time.perf_counter() - started < 10  # 2 s of silence, not 120
            if agent.assigned:
                break
        assert agent.assigned, "the silent agent was never tried"
        assert response.json()["x_pool"]["attempts"] == 2  # the silent agent, then another
    details = await evidence(arena, token_id, trust.FAILED)
    assert any(TIMED_OUT_TEXT in detail for detail in details)
    await books_balance(arena)


TIMED_OUT_TEXT = "no output for 2 s"


async def test_a_slow_whole_reply_from_an_honest_agent_still_arrives(arena: Pool) -> None:
    # SmolLM2 (about 120 tokens/s here) needs several times the 2 s of allowed silence for 600
    # tokens with its end-of-turn tokens banned: the agent's progress messages keep the job alive.
    body = {"model": SLUG, "messages": HI, "max_tokens": 600, "logit_bias": {"0": -100, "1": -100, "2": -100}}
    started = time.perf_counter()
    response = await chat(arena, body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 600
    assert elapsed > 2, f"the reply took {elapsed:.1f} s, within the silence window: it shows nothing"
    await books_balance(arena)


# --- 6. the request that reaches the backend is the one that was priced -------------------------


async def test_backend_fields_cannot_raise_the_output_beyond_the_price(arena: Pool) -> None:
    body = {"model": SLUG, "messages": HI, "max_tokens": 1, "n_predict": 4096, "ignore_eos": True, "temperature": 0}
    response = await chat(arena, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1
    billed = await generation(arena, response.json()["x_pool"]["request_id"])
    assert billed["completionTokens"] == 1
    image = {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}
    refused = await chat(arena, {"model": SLUG, "messages": [{"role": "user", "content": [image]}]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages[0].content[0].image_url.url"
    await books_balance(arena)


# --- 9. hanging up mid-stream ------------------------------------------------------------------


async def test_a_consumer_who_hangs_up_pays_for_the_prompt_processed(arena: Pool) -> None:
    token, token_id = provider(arena)
    prompt = "lorem ipsum dolor sit amet " * 4000  # about 100 KB

    async def slow(agent: HostileAgent, job: JobAssign) -> None:
        await agent.stream(job.job_id, [chunk(word) for word in WORDS], usage=Usage(30_000, 5, 30_005), pause=0.3)

    async with HostileAgent(arena.url, token, serve=slow) as agent:
        body = {
            "model": SLUG,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "provider": only(token_id, arena),
        }
        request_id = ""
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream(
                "POST", f"{arena.url}/v1/chat/completions", headers={"authorization": f"Bearer {arena.key}"}, json=body
            ) as response,
        ):
            request_id = response.headers["x-request-id"]
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 4:
                        break
        await eventually_async(lambda: agent.cancelled)
    billed = await generation(arena, request_id)
    assert billed["status"] == 499
    assert billed["promptTokens"] == len(prompt) // 4 + 4
    assert 1 <= billed["completionTokens"] <= 4
    await books_balance(arena)


# --- 13, 14, 15. the connection itself -----------------------------------------------------------


async def test_deeply_nested_frames_close_only_that_connection(arena: Pool) -> None:
    token, _ = provider(arena)
    async with HostileAgent(arena.url, token) as agent:
        await agent.send_raw(b"\x91" * 100_000 + b"\xc0")  # a msgpack array nested 100,000 deep
        await asyncio.wait_for(agent.closed.wait(), 10)
    assert "RecursionError" not in (arena.coordinator.output() if arena.coordinator else "")
    response = await chat(arena, {"model": SLUG, "messages": HI, "max_tokens": 3})
    assert response.status_code == 200
    await books_balance(arena)


async def test_one_token_opens_a_bounded_number_of_connections_sharing_one_concurrency(arena: Pool) -> None:
    token, token_id = provider(arena)
    release = asyncio.Event()

    async def hold(agent: HostileAgent, job: JobAssign) -> None:
        await release.wait()
        await agent.send(JobDone(job_id=job.job_id, usage=Usage(3, 1, 4), tail=[reply("ok")]))

    agents = [HostileAgent(arena.url, token, serve=hold) for _ in range(5)]
    for agent in agents:
        await agent.__aenter__()
    try:
        assert [agent.rejected is None for agent in agents] == [True] * 4 + [False]
        assert "already has 4 agents connected" in (agents[4].rejected or "")
        body = {"model": SLUG, "messages": HI, "max_tokens": 3, "provider": only(token_id, arena)}
        requests = [asyncio.create_task(chat(arena, body)) for _ in range(6)]
        await eventually_async(lambda: sum(len(a.assigned) for a in agents) >= 2)
        await eventually_async(lambda: sum(request.done() for request in requests) == 4)  # refused while two run
        assert sum(len(a.assigned) for a in agents) == 2  # the new-agent cap counts the token's jobs together
        release.set()
        statuses = sorted(r.status_code for r in await asyncio.gather(*requests))
        assert statuses == [200, 200, 503, 503, 503, 503]
    finally:
        for agent in agents:
            await agent.__aexit__()
    await books_balance(arena)


async def test_frames_for_other_agents_jobs_and_unknown_tags_change_nothing(arena: Pool) -> None:
    token, token_id = provider(arena)
    other_token, _ = provider(arena)
    got_job: asyncio.Queue[str] = asyncio.Queue()

    async def honest(agent: HostileAgent, job: JobAssign) -> None:
        await got_job.put(job.job_id)
        await asyncio.sleep(0.5)  # pacing, not waiting: the job stays open while the thief's frames arrive
        await agent.send(JobDone(job_id=job.job_id, usage=Usage(3, 1, 4), tail=[reply("mine")]))

    async with (
        HostileAgent(arena.url, token, serve=honest),
        HostileAgent(arena.url, other_token) as thief,
    ):
        body = {"model": SLUG, "messages": HI, "max_tokens": 3, "provider": only(token_id, arena)}
        request = asyncio.create_task(chat(arena, body))
        job_id = await asyncio.wait_for(got_job.get(), 10)
        await thief.send(JobDone(job_id=job_id, usage=Usage(1, 999, 1000), tail=[reply("stolen")]))
        for _ in range(2000):
            await thief.send_raw(msgspec.msgpack.encode({"type": "no.such.tag", "junk": "x" * 200}))
        response = await request
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "mine"
        billed = await generation(arena, response.headers["x-request-id"])
        assert (billed["completionTokens"], billed["reportedCompletionTokens"]) == (1, 1)
    assert arena.coordinator is not None
    assert arena.coordinator.output().count("unknown message skipped") <= 12
    await books_balance(arena)
