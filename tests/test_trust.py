"""Trust scores and the audit of every job: the arithmetic, each check, and a pool of real agents —
an honest one on llama.cpp with SmolLM2 beside cheating backends — where every cheater falls below
the routing threshold within a bounded number of jobs and consumers pay only for honest work."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from coordinator import audit, trust
from coordinator.audit import Output, read_output
from coordinator.trust import Evidence, Reputation, reputation_of
from scripts import localpool
from shared.protocol import Usage
from tests.harness import Pool

HOUR = 3600.0


def test_new_agents_start_at_50_and_one_clear_cheat_sinks_them() -> None:
    assert Reputation().score() == 50.0
    for kind in (trust.USAGE_INFLATED, trust.IMPLAUSIBLE_SPEED, trust.BAD_OUTPUT, trust.STALLED, trust.CANARY_FAILED):
        reputation = Reputation()
        reputation.add(trust.WEIGHTS[kind], 1000.0, HOUR)
        assert reputation.score() < 40.0, kind
    # an honest hiccup does not: one failure, one lost heartbeat
    reputation = Reputation()
    reputation.add(trust.WEIGHTS[trust.FAILED], 1000.0, HOUR)
    assert reputation.score() > 40.0
    reputation.add(trust.WEIGHTS[trust.COMPLETED], 1001.0, HOUR)
    reputation.add(trust.WEIGHTS[trust.HEARTBEAT_MISSED], 1002.0, HOUR)
    assert reputation.score() > 40.0


def test_scores_decay_toward_the_prior_and_add_up_from_stored_evidence() -> None:
    evidence = [Evidence(1, 1, trust.COMPLETED, 0.0, count=20), Evidence(1, 1, trust.USAGE_INFLATED, 10.0)]
    now = reputation_of(evidence, HOUR, 10.0)
    assert now.score() == pytest.approx(100 * 23 / (23 + 11))
    later = reputation_of(evidence, HOUR, 10.0 + 10 * HOUR)
    assert abs(later.score() - 50.0) < 1.0  # ten half-lives on, next to nothing is left
    # order of arrival does not matter, the times do
    assert reputation_of(list(reversed(evidence)), HOUR, 10.0).score() == pytest.approx(now.score())
    # incremental adding equals recomputing
    incremental = Reputation()
    for item in evidence:
        incremental.add(item.weight, item.at, HOUR, item.count)
    incremental.decay_to(10.0 + HOUR, HOUR)
    assert incremental.score() == pytest.approx(reputation_of(evidence, HOUR, 10.0 + HOUR).score())


def test_trust_limits_concurrency_until_trusted() -> None:
    assert trust.concurrency_cap(50.0, 2) == 2
    assert trust.concurrency_cap(trust.TRUSTED, 2) is None


def _chunk(content: str) -> bytes:
    return msgspec.json.encode({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


STOP = msgspec.json.encode({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


def _job(payloads: list[bytes], *, reported: int | None, seconds: float = 1.0, stream: bool = True) -> audit.Job:
    output = read_output(payloads)
    delivered = sum(1 for p in payloads if b'"content":"' in p and b'"content":""' not in p)
    usage = None if reported is None else Usage(5, reported, 5 + reported)
    return audit.Job(stream, delivered, usage, output, seconds, 135_000_000)


def _kinds(job: audit.Job) -> list[str]:
    return [kind for kind, _ in audit.judge(job).findings]


def test_audit_passes_honest_work() -> None:
    words = [_chunk(f"w{i} ") for i in range(40)]
    assert _kinds(_job([*words, STOP], reported=40)) == []
    assert _kinds(_job([*words, STOP], reported=44)) == []  # a few held-back tokens are tolerated
    assert _kinds(_job([*words, STOP], reported=None)) == []
    # non-stream: the whole reply, tokens bounded by its bytes
    body = msgspec.json.encode(
        {"choices": [{"index": 0, "message": {"content": "Paris is the capital."}, "finish_reason": "stop"}]}
    )
    assert _kinds(_job([body], reported=6, stream=False)) == []
    tools = msgspec.json.encode(
        {
            "choices": [
                {"index": 0, "message": {"content": None, "tool_calls": [{"id": "1"}]}, "finish_reason": "tool_calls"}
            ]
        }
    )
    assert _kinds(_job([tools], reported=30, stream=False)) == []


def test_audit_catches_each_cheat_and_bills_what_it_can_vouch_for() -> None:
    words = [_chunk(f"w{i} ") for i in range(20)]
    inflated = audit.judge(_job([*words, STOP], reported=40))
    assert [k for k, _ in inflated.findings] == [trust.USAGE_INFLATED]
    assert inflated.completion_tokens == 20 and inflated.billable
    assert _kinds(_job([*words, STOP], reported=20, seconds=0.002)) == [trust.IMPLAUSIBLE_SPEED]
    assert not audit.judge(_job([*words, STOP], reported=20, seconds=0.002)).billable
    assert _kinds(_job([*words[:10], STOP], reported=10, seconds=0.001)) == []  # too few tokens to judge speed
    assert _kinds(_job([*[_chunk("zzz ")] * 16, STOP], reported=16)) == [trust.BAD_OUTPUT]
    assert _kinds(_job([STOP], reported=0)) == [trust.BAD_OUTPUT]  # empty output marked stop
    assert _kinds(_job([b'{"choices":[{"delta":{"content":"\xff\xfe"}}]}', STOP], reported=1)) == [trust.BAD_OUTPUT]
    assert _kinds(_job([_chunk("\ufffd" * 8), STOP], reported=1)) == [trust.BAD_OUTPUT]
    assert not audit.judge(_job([STOP], reported=0)).billable
    big = msgspec.json.encode({"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]})
    assert _kinds(_job([big], reported=500, stream=False)) == [trust.USAGE_INFLATED]


def test_output_reader_keeps_finish_reason_and_text() -> None:
    output = read_output([_chunk("Hel"), _chunk("lo"), STOP])
    assert output == Output(text="Hello", tool_calls=False, finish_reason="stop", valid=True)


# --- real agents, honest and cheating ------------------------------------------------------------

CHEATS = {
    "inflate": ({"mode": "inflate", "chunks": 20, "interval_ms": 10}, trust.USAGE_INFLATED),
    "garbage": ({"mode": "garbage", "chunks": 20, "interval_ms": 10}, trust.BAD_OUTPUT),
    "stall": ({"mode": "stall", "chunks": 20, "interval_ms": 10}, trust.STALLED),
    "speed": ({"chunks": 1000}, trust.IMPLAUSIBLE_SPEED),  # 1000 tokens in a few milliseconds
}
QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def judged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A pool with the production defaults for trust (threshold 40, new agents at 2 jobs at once)."""
    harness = Pool(tmp_path_factory.mktemp("trust"), idle_timeout="2", new_agent_concurrency="2", trust_threshold="40")
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def _provider(pool: Pool, name: str) -> tuple[str, str]:
    """A new provider: its agent token and a key to read its provider API."""
    email = f"{name}@providers.example"
    localpool.admin(pool.env, "create-user", "--email", email)
    return (
        localpool.admin(pool.env, "create-agent-token", "--email", email),
        localpool.admin(pool.env, "create-key", "--email", email),
    )


def _standing(pool: Pool, key: str) -> dict[str, object]:
    response = httpx.get(f"{pool.url}/v1/provider/agents", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert response.status_code == 200, response.text
    agents = response.json()["agents"]
    assert len(agents) == 1
    return dict(agents[0])


async def _request(client: httpx.AsyncClient, pool: Pool) -> tuple[str | None, float]:
    """One streamed consumer request: the agent that served it (if it finished) and what it cost."""
    body = {"model": "smollm2-135m", "messages": QUESTION, "max_tokens": 24, "stream": True, "temperature": 0}
    x_pool = None
    async with client.stream("POST", f"{pool.url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return None, 0.0
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"x_pool"' in line:
                x_pool = msgspec.json.decode(line[6:])["x_pool"]
    return (x_pool["agent"], x_pool["cost_usd"]) if x_pool else (None, 0.0)


@pytest.mark.slow
def test_cheaters_fall_below_the_threshold_and_consumers_pay_only_honest_work(judged: Pool, llama: str) -> None:
    pool = judged
    honest_token, honest_key = _provider(pool, "honest")
    pool.agent(llama, ["smollm2-135m"], token=honest_token, max_concurrency=4)
    keys = {}
    for name, (options, _) in CHEATS.items():
        token, keys[name] = _provider(pool, name)
        pool.agent(pool.standin(**options), ["smollm2-135m"], token=token, max_concurrency=4)
    cheater_of = {_standing(pool, key)["connected"][0]["agentId"]: name for name, key in keys.items()}  # type: ignore[index]
    honest_agent = _standing(pool, honest_key)["connected"][0]["agentId"]  # type: ignore[index]
    spent_before = _spent(pool)

    served = []
    for _ in range(10):  # rounds of 4 concurrent requests: cheaters and the honest agent compete
        served += asyncio.run(_round(pool))
    time.sleep(2.5)  # trust evidence is written every 2 s
    jobs_to_catch = {}
    for name, key in keys.items():
        standing = _standing(pool, key)
        evidence = standing["evidence"]
        assert standing["trustScore"] < 40 and standing["routable"] is False, (name, standing)
        kinds = Counter(item["kind"] for item in evidence)  # type: ignore[attr-defined]
        assert kinds[CHEATS[name][1]] >= 1, (name, evidence)
        jobs_to_catch[name] = sum(item["count"] for item in evidence)  # type: ignore[attr-defined]
    honest = _standing(pool, honest_key)
    assert honest["routable"] is True and honest["trustScore"] > 50, honest
    assert {item["kind"] for item in honest["evidence"]} == {trust.COMPLETED}  # type: ignore[attr-defined]
    print("\njobs to catch:", jobs_to_catch)
    scores = [_standing(pool, key)["trustScore"] for key in (honest_key, *keys.values())]
    listing = httpx.get(f"{pool.url}/v1/models", timeout=5).json()["data"]
    published = next(m["avgTrustScore"] for m in listing if m["id"] == "smollm2-135m")
    assert published == pytest.approx(sum(scores) / len(scores), abs=0.5)  # type: ignore[arg-type]
    # a new agent runs 2 jobs at once, so up to 2 start before the first verdict; one more for slack
    assert all(jobs <= 3 for jobs in jobs_to_catch.values()), jobs_to_catch

    # once caught, cheaters get no more consumer traffic: the honest agent serves everything
    late = asyncio.run(_round(pool))
    assert [agent for agent, _ in late] == [honest_agent] * 4, late
    # consumers paid for the honest agent's work and the inflater's tokens as counted, nothing else
    for agent, cost in served:
        if cheater_of.get(str(agent)) in ("garbage", "speed", "stall"):
            assert cost == 0, (cheater_of[str(agent)], cost)
        if cheater_of.get(str(agent)) == "inflate":
            assert cost == pytest.approx((5 * 0.1 + 20 * 0.2) / 1e6), cost  # 20 tokens, not the 40 reported
    assert any(agent == honest_agent and cost > 0 for agent, cost in served)
    assert _spent(pool) - spent_before == pytest.approx(sum(cost for _, cost in [*served, *late]), abs=1e-9)


async def _round(pool: Pool) -> list[tuple[str | None, float]]:
    async with httpx.AsyncClient(timeout=60, headers={"authorization": f"Bearer {pool.key}"}) as client:
        return list(await asyncio.gather(*(_request(client, pool) for _ in range(4))))


def _spent(pool: Pool) -> float:
    time.sleep(1.5)  # charges are written once a second
    credits = httpx.get(f"{pool.url}/v1/credits", headers={"authorization": f"Bearer {pool.key}"}, timeout=10).json()
    return float(1000 - credits["balanceUsd"])
