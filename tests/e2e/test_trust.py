"""Trust with the real models: honest agents on llama.cpp (SmolLM2) beside cheating backends, a
model swapper that looks for canaries and colluding accounts. Every cheater falls below the routing
threshold within a bounded number of jobs, and consumers pay only for honest work."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest

from coordinator.core.settings import Settings
from coordinator.serving.verify import CANARY
from coordinator.trust import canaries
from coordinator.trust import scores as trust
from coordinator.trust.scores import Reputation
from scripts import localpool
from tests.harness import Pool
from tests.waiting import eventually, eventually_async

CHEATS = {
    "inflate": ({"mode": "inflate", "chunks": 20, "interval_ms": 10}, trust.USAGE_INFLATED),
    "garbage": ({"mode": "garbage", "chunks": 20, "interval_ms": 10}, trust.BAD_OUTPUT),
    "stall": ({"mode": "stall", "chunks": 20, "interval_ms": 10}, trust.STALLED),
    # 1000 tokens in a few milliseconds, whatever max_tokens says: the pool cuts it at the request's
    # bound as an overrun before its speed is judged (implausible speed: tests/unit/test_audit.py)
    "speed": ({"chunks": 1000}, trust.OVERRAN),
}
TRUST_HALF_LIFE = Settings().trust_half_life  # the harness keeps the default
QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def judged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A pool with the production rules for trust (threshold 40, new agents at 2 jobs at once) and
    verification jobs every quarter second."""
    harness = Pool(
        tmp_path_factory.mktemp("trust"),
        idle_timeout="10",  # a stall cheat never resumes; honest llama.cpp on 2 busy cores pauses for seconds
        new_agent_concurrency="2",
        trust_threshold="40",
        canary_interval_seconds="0.25",
        directory_reload_seconds="1",  # vouching reaches the coordinator within a second
    )
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def _jobs_until_caught(pool: Pool, token_id: int) -> tuple[int, int]:
    """Replay a token's stored evidence as the live score weighs it (each row at its own time, decayed
    with the pool's half-life): (jobs, consumer jobs) it took until its score first fell below the
    threshold (evidence from verification jobs says so in its detail). Without the decay a replay
    can end on exactly 40.0 where the live score, whose failures are the newest, is just under it."""
    with sqlite3.connect(pool.db_url.removeprefix("sqlite+aiosqlite:///")) as db:
        rows = db.execute(
            "SELECT kind, count, detail, created_at FROM trust_evidence WHERE agent_token_id = ? "
            "ORDER BY created_at, id",
            (token_id,),
        ).fetchall()
    reputation, jobs, consumer = Reputation(), 0, 0
    for kind, count, detail, created_at in rows:
        at = datetime.fromisoformat(created_at).replace(tzinfo=UTC).timestamp()
        reputation.add(trust.WEIGHTS[kind], at, TRUST_HALF_LIFE, count)
        jobs += count
        consumer += 0 if detail.startswith(CANARY) else count
        if reputation.score() < 40:
            return jobs, consumer
    raise AssertionError(f"token {token_id} was never caught: {rows}")


async def _request(client: httpx.AsyncClient, pool: Pool, only: str | None = None) -> tuple[str | None, float]:
    """One streamed consumer request: the agent that served it (if it finished) and what it cost."""
    body: dict[str, Any] = {"model": "smollm2-135m", "messages": QUESTION, "max_tokens": 24, "stream": True}
    body["temperature"] = 0
    if only is not None:
        body["provider"] = {"only": [only]}
    x_pool = None
    async with client.stream("POST", f"{pool.url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return None, 0.0
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"x_pool"' in line:
                x_pool = msgspec.json.decode(line[6:])["x_pool"]
    return (x_pool["agent"], x_pool["cost_usd"]) if x_pool else (None, 0.0)


def test_adversarial_pool_catches_every_cheater(judged: Pool, llama: str, gemma: str) -> None:
    pool = judged
    spent_before = _spent(pool)
    # The wrong model connects first, and a consumer asks for it by name: it serves and is paid, as
    # nothing is known of it yet; once a canary shows what it runs, those jobs are refunded.
    keys = {}
    token, keys["wrong-model"] = pool.new_provider("wrong-model")
    # Chat canaries catch these cheats (completion canaries are tests/integration/test_verification.py's):
    # every agent here announces chat alone.
    pool.agent(gemma, ["smollm2-135m=local-model"], token=token, max_concurrency=2, kinds="chat")  # Gemma 3 270M
    forced = _served_by(pool, pool.standing(keys["wrong-model"])["connected"][0]["agentId"], 2)
    assert all(cost > 0 for _, cost in forced), forced
    honest = {}
    for name in ("honest-a", "honest-b"):  # providers the operator vouches for: their answers are references
        token, honest[name] = pool.new_provider(name)
        localpool.admin(pool.env, "vouch", "--email", f"{name}@providers.example")
        pool.agent(llama, ["smollm2-135m"], token=token, max_concurrency=4, kinds="chat")
    for name, (options, _) in CHEATS.items():
        token, keys[name] = pool.new_provider(name)
        pool.agent(pool.standin(**options), ["smollm2-135m"], token=token, max_concurrency=4, kinds="chat")
    expected = {**{name: kind for name, (_, kind) in CHEATS.items()}, "wrong-model": trust.CANARY_FAILED}
    standings = {name: pool.standing(key) for name, key in {**keys, **honest}.items()}
    agent_of = {name: standing["connected"][0]["agentId"] for name, standing in standings.items()}
    name_of = {agent: name for name, agent in agent_of.items()}
    served: list[tuple[str | None, float]] = list(forced)
    caught: set[str] = set()
    for _ in range(60):  # rounds of 4 concurrent requests, until every cheater is out
        served += asyncio.run(_round(pool))
        caught = {name for name, key in keys.items() if not pool.standing(key)["routable"]}
        if caught == set(keys):
            break
    if caught != set(keys):  # say why before failing
        for name, key in {**keys, **honest}.items():
            standing = pool.standing(key)
            print(name, standing["trustScore"], [(e["kind"], e["detail"]) for e in standing["evidence"][:5]])
    assert caught == set(keys)
    table = {}
    for name, key in keys.items():
        standing = pool.standing(key)
        kinds = {item["kind"] for item in standing["evidence"]}
        assert expected[name] in kinds, (name, standing["evidence"])
        table[name] = _jobs_until_caught(pool, standing["tokenId"])
    served_by = {name: sum(1 for agent, _ in served if name_of.get(str(agent)) == name) for name in keys}
    print("\ncheater: (jobs, consumer jobs) until below the threshold:", table)
    print("consumer requests each cheater finished, in all:", served_by)

    for name, key in honest.items():  # vouched: their canary answers are references, nothing counts against them
        standing = pool.standing(key)
        assert standing["routable"] is True and standing["trustScore"] >= 50, (name, standing)
        assert {item["kind"] for item in standing["evidence"]} <= {trust.COMPLETED, trust.CANARY_PASSED}, standing
    # the audit catches its cheats within the 2 jobs a new agent runs at once (and one for slack);
    # the wrong model, at its first canary judged against a vouched provider's reference (in this
    # pool, with a canary every quarter second, within a few rounds)
    assert all(table[name][0] <= 3 for name in CHEATS), table
    assert table["wrong-model"][0] <= 30, table

    # once caught, cheaters get no more consumer traffic
    late: list[tuple[str | None, float]] = []
    for _ in range(10):  # some may find no free slot on a busy machine
        late += asyncio.run(_round(pool))
        if any(agent for agent, _ in late):
            break
    assert {name_of.get(str(agent)) for agent, _ in late if agent is not None} <= {"honest-a", "honest-b"}, late
    # consumers paid for honest work and the inflater's tokens as counted; not for garbage, stalls or
    # impossible speed, and the wrong model's jobs were refunded once its canary failed
    for agent, cost in served:
        name = name_of.get(str(agent))
        if name in ("garbage", "speed", "stall"):
            assert cost == 0, (name, cost)
        if name == "inflate":
            assert cost == pytest.approx((5 * 0.1 + 20 * 0.2) / 1e6), cost  # 20 tokens, not the 40 reported
    assert any(name_of.get(str(agent), "").startswith("honest") and cost > 0 for agent, cost in served)
    honest_work = sum(cost for agent, cost in [*served, *late] if name_of.get(str(agent)) != "wrong-model")
    # The wrong model's jobs are refunded once two failed canaries confirm it, all but those a canary
    # it passed vouched for first: Gemma gives SmolLM2's answer to some short questions, and then the
    # jobs before that answer stand (clawback.py). Without such a pass, every one is refunded.
    wrong_agent, wrong_token = agent_of["wrong-model"], standings["wrong-model"]["tokenId"]

    def settled() -> bool:
        """The books agree with the request log, and with no pass to vouch for them, every paid job
        of the wrong model has been refunded."""
        if abs(_spent(pool) - spent_before - honest_work - _kept(pool, wrong_agent)[0]) > 1e-9:
            return False
        passed = trust.CANARY_PASSED in {kind for kind, _ in _token_evidence(pool, wrong_token)}
        return passed or all(refund for *_, refund in _paid_jobs(pool, wrong_agent))

    eventually(  # refunds are written in the background, once a second
        settled,
        timeout=15,
        interval=0.5,
        explain=lambda: f"spent {_spent(pool) - spent_before}, honest {honest_work}, {_paid_jobs(pool, wrong_agent)}",
    )
    wrong = _paid_jobs(pool, wrong_agent)
    (kept, share), refunded = _kept(pool, wrong_agent), sum(1 for *_, refund in wrong if refund)
    print(f"wrong model: {refunded} of {len(wrong)} paid jobs refunded, ${kept:.9f} vouched for by a canary it passed")
    assert len(wrong) >= len(forced)
    earned = httpx.get(
        f"{pool.url}/v1/provider/earnings", headers={"authorization": f"Bearer {keys['wrong-model']}"}, timeout=10
    )
    assert earned.json()["balanceUsd"] == pytest.approx(share, abs=1e-9), earned.text  # the rest came back out
    usage = httpx.get(f"{pool.url}/v1/usage", headers={"authorization": f"Bearer {pool.key}"}, timeout=10).json()
    assert sum(row["costUsd"] for row in usage["data"]) == pytest.approx(honest_work + kept, abs=1e-9)  # reports agree
    # The directory publishes the trust of those that can serve: caught cheaters below the threshold
    # get no traffic, so they neither lower the average nor count as providers.
    standings = [pool.standing(key) for key in [*keys.values(), *honest.values()]]
    scores = [s["trustScore"] for s in standings if s["routable"]]
    listing = httpx.get(f"{pool.url}/v1/models", timeout=5).json()["data"]
    entry = next(m for m in listing if m["id"] == "smollm2-135m")
    assert scores and entry["avgTrustScore"] == pytest.approx(sum(scores) / len(scores), abs=1.0)
    assert len(scores) < len(standings)  # some were caught


async def _round(pool: Pool) -> list[tuple[str | None, float]]:
    async with httpx.AsyncClient(timeout=60, headers={"authorization": f"Bearer {pool.key}"}) as client:
        return list(await asyncio.gather(*(_request(client, pool) for _ in range(4))))


def _served_by(pool: Pool, agent: str, jobs: int) -> list[tuple[str | None, float]]:
    """``jobs`` consumer requests that only ``agent`` may serve, each retried while its slots are
    busy with verification jobs."""

    async def run() -> list[tuple[str | None, float]]:
        served: list[tuple[str | None, float]] = []
        async with httpx.AsyncClient(timeout=60, headers={"authorization": f"Bearer {pool.key}"}) as client:
            for _ in range(200):
                result = await _request(client, pool, only=agent)
                if result[0] is not None:
                    served.append(result)
                    if len(served) == jobs:
                        break
                else:
                    await asyncio.sleep(0.1)  # back off while verification jobs hold its slots
        assert [by for by, _ in served] == [agent] * jobs, served
        return served

    return asyncio.run(run())


def _paid_jobs(pool: Pool, agent: str) -> list[tuple[int, int, bool]]:
    """The agent's consumer jobs that cost something: (cost, provider's share, refunded), nano-USD."""
    rows = pool.query("SELECT cost, provider_earned, refunded FROM request_log WHERE agent_id = ? AND cost > 0", agent)
    return [(int(cost), int(earned), bool(refunded)) for cost, earned, refunded in rows]


def _kept(pool: Pool, agent: str) -> tuple[float, float]:
    """USD the agent's consumers paid and were not given back, and the provider's share of it."""
    jobs = [(cost, earned) for cost, earned, refunded in _paid_jobs(pool, agent) if not refunded]
    return sum(cost for cost, _ in jobs) / 1e9, sum(earned for _, earned in jobs) / 1e9


def _spent(pool: Pool) -> float:
    """What the test consumer has spent (reading credits writes the process's booked charges first)."""
    credits = httpx.get(f"{pool.url}/v1/credits", headers={"authorization": f"Bearer {pool.key}"}, timeout=10).json()
    return float(1000 - credits["balanceUsd"])


# --- a model swapper that looks for canaries, and colluding accounts --------------------------------

OPERATOR_PROMPTS = (  # the operator's own canaries: in no public list
    "What is the capital city of Mongolia?",
    "Which planet is known as the red planet?",
    "What is the largest mammal in the world?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "What do caterpillars turn into?",
    "Name the longest river in Africa.",
    "What instrument has black and white keys?",
    "How many strings does a standard guitar have?",
    "What is the main ingredient of guacamole?",
    "Which season comes after autumn?",
    "What is frozen water called?",
    "Who painted the Mona Lisa?",
    "What is the hardest natural substance?",
    "How many players are on a football team?",
    "Which bird is a symbol of peace?",
    "What is the main language of Brazil?",
    "What shape has three sides?",
    "What do you call a baby cat?",
    "Which organ pumps blood through the body?",
    "What is the closest star to Earth?",
)
CONSUMER_PROMPTS = (
    "Summarise the plot of Hamlet in two sentences.",
    "Suggest a name for a small bakery.",
    "Write a polite reply declining a meeting invitation.",
    "What are good habits for learning a language?",
    "Give me a short motivational quote.",
    "Explain what a database index is.",
    "Write a tweet announcing a product launch.",
    "How should I store fresh basil?",
)
CONSUMER_SHAPES: tuple[dict[str, Any], ...] = (  # the traffic canaries come to look like; all deterministic
    {"max_tokens": 32, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0},
    {"max_tokens": 48, "seed": 3, "temperature": 0.0},
    {"stream": True, "max_tokens": 100, "temperature": 0},
)


def _detector(pool: Pool, canary: str, other: str) -> str:
    """Start the cheating backend (tests/detector.py); returns its base URL."""
    port = localpool.free_port()
    argv = [sys.executable, "-m", "tests.detector", "--port", str(port), "--canary", canary, "--other", other]
    proc = localpool.spawn("detector", argv, pool.dir)
    pool.backends.append(proc)
    localpool.wait_http(f"http://127.0.0.1:{port}/_log", proc)
    return f"http://127.0.0.1:{port}"


async def _consumer(client: httpx.AsyncClient, pool: Pool, agent: str, n: int) -> tuple[bool, float]:
    """One consumer request in one of the traffic's shapes, served only by ``agent``: (served, cost)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": CONSUMER_PROMPTS[n % len(CONSUMER_PROMPTS)]}]}
    body["model"] = "smollm2-135m"
    body.update(CONSUMER_SHAPES[n % len(CONSUMER_SHAPES)])
    body["provider"] = {"only": [agent]}
    response = await client.post(f"{pool.url}/v1/chat/completions", json=body)
    if response.status_code != 200:
        return False, 0.0
    if not body.get("stream"):
        return True, float(response.json()["x_pool"]["cost_usd"])
    lines = [line for line in response.text.splitlines() if '"x_pool"' in line]
    return bool(lines), float(msgspec.json.decode(lines[-1][6:])["x_pool"]["cost_usd"]) if lines else 0.0


def _token_evidence(pool: Pool, token_id: int) -> list[tuple[str, str]]:
    with sqlite3.connect(pool.db_url.removeprefix("sqlite+aiosqlite:///")) as db:
        rows = db.execute("SELECT kind, detail FROM trust_evidence WHERE agent_token_id = ?", (token_id,)).fetchall()
    return [(kind, detail) for kind, detail in rows]


def test_a_model_swapper_that_detects_canaries_is_caught(
    tmp_path_factory: pytest.TempPathFactory, llama: str, gemma: str
) -> None:
    """An agent behind tests/detector.py: SmolLM2 for what it takes for a canary, Gemma for the rest.
    The platform upstream (SmolLM2 too) gives the references; the operator has prompts of its own."""
    workdir = tmp_path_factory.mktemp("detector")
    prompts = workdir / "canary-prompts.txt"
    prompts.write_text("\n".join(OPERATOR_PROMPTS) + "\n")
    assert not set(OPERATOR_PROMPTS + CONSUMER_PROMPTS) & set(canaries.shipped())
    pool = Pool(
        workdir,
        trust_threshold="40",
        new_agent_concurrency="2",
        canary_interval_seconds="0.5",
        canary_prompts_file=str(prompts),
        upstream_base_url=f"{llama}/v1",
        upstream_models="smollm2-135m=local-model",
    )
    pool.start()
    try:
        token, key = pool.new_provider("swapper")
        detector = _detector(pool, canary=llama, other=gemma)
        pool.agent(detector, ["smollm2-135m=local-model"], token=token, max_concurrency=4)
        standing = pool.standing(key)
        agent, token_id = standing["connected"][0]["agentId"], standing["tokenId"]

        async def traffic() -> list[tuple[bool, float]]:
            """Consumer requests, two at a time, until the swapper is out (retried while canaries
            hold its slots)."""
            served: list[tuple[bool, float]] = []
            async with httpx.AsyncClient(timeout=120, headers={"authorization": f"Bearer {pool.key}"}) as client:

                async def out() -> bool:
                    if not pool.standing(key)["routable"]:
                        return True
                    results = await asyncio.gather(*(_consumer(client, pool, agent, len(served) + i) for i in range(2)))
                    served.extend(result for result in results if result[0])
                    if not any(ok for ok, _ in results):
                        await asyncio.sleep(0.2)  # back off while canaries hold its slots
                    return False

                await eventually_async(out, timeout=180, interval=0)
            return served

        served = asyncio.run(traffic())
        assert not pool.standing(key)["routable"]
        kinds = [kind for kind, _ in _token_evidence(pool, token_id)]
        assert trust.CANARY_FAILED in kinds, kinds
        jobs, consumer_jobs = _jobs_until_caught(pool, token_id)
        paid = sum(cost for ok, cost in served if ok)
        earnings = f"{pool.url}/v1/provider/earnings"

        def balance() -> float:
            return float(
                httpx.get(earnings, headers={"authorization": f"Bearer {key}"}, timeout=10).json()["balanceUsd"]
            )

        # Two failures on the operator's prompts confirm it; then its jobs are refunded, all but those
        # a passed operator canary vouched for first (Gemma gives SmolLM2's answer to some short
        # questions; clawback.py), and its share of those alone stays in its earnings.
        eventually(
            lambda: abs(balance() - _kept(pool, agent)[1]) <= 1e-9 and (paid == 0 or _kept(pool, agent)[0] < paid),
            timeout=60,
            interval=0.5,
            explain=lambda: f"earnings {balance()}, paid {paid}, jobs {_paid_jobs(pool, agent)}",
        )
        jobs_paid = _paid_jobs(pool, agent)
        charged, refunded = len(jobs_paid), sum(1 for *_, refund in jobs_paid if refund)
        # Paid before it was caught, and at least the last of it came back; on a busy machine canaries
        # may catch it first.
        assert (charged > 0) == (paid > 0)

        def sample() -> list[dict[str, Any]] | None:  # canaries go on: a sample large enough to count what it flags
            log: list[dict[str, Any]] = httpx.get(f"{detector}/_log", timeout=5).json()
            return log if len(log) >= 30 else None

        log = eventually(sample, timeout=60, interval=0.5)
        consumer = [entry for entry in log if entry["prompt"] in CONSUMER_PROMPTS]
        canary = [entry for entry in log if entry["prompt"] not in CONSUMER_PROMPTS]
        secret = [entry for entry in canary if entry["prompt"] in OPERATOR_PROMPTS]
        reasons: dict[str, int] = {}
        for entry in log:
            for reason in entry["reasons"]:
                reasons[reason] = reasons.get(reason, 0) + 1
        flagged = sum(1 for entry in canary if entry["reasons"])
        print(
            f"\ndetector flagged {flagged}/{len(canary)} canaries ({sum(1 for e in secret if e['reasons'])}"
            f"/{len(secret)} of the operator's) and {sum(1 for e in consumer if e['reasons'])}/{len(consumer)} "
            f"consumer jobs; by fingerprint {reasons}; caught after {jobs} jobs ({consumer_jobs} consumer); "
            f"{refunded}/{charged} paid consumer jobs refunded"
        )
        assert "old" not in reasons and "old_order" not in reasons  # the old fingerprint finds nothing
        assert not any(entry["reasons"] for entry in consumer)  # so it cheated every consumer...
        assert any(not entry["reasons"] for entry in secret)  # ...and missed the operator's canaries
    finally:
        pool.stop()


def test_colluding_accounts_cannot_make_their_wrong_answer_the_reference(
    tmp_path_factory: pytest.TempPathFactory, llama: str, gemma: str
) -> None:
    """Two ordinary accounts run the same wrong model and buy their agents into "trusted" with
    provider.only jobs; their canary answers agree, and stay unjudged answers: only the vouched
    provider's make a reference, which then catches them."""
    pool = Pool(
        tmp_path_factory.mktemp("collusion"),
        trust_threshold="40",
        new_agent_concurrency="2",
        canary_interval_seconds="1",
        directory_reload_seconds="1",
    )
    pool.start()
    try:
        keys = {}
        for name in ("sybil-a", "sybil-b"):
            token, keys[name] = pool.new_provider(name)
            pool.agent(gemma, ["smollm2-135m=local-model"], token=token, max_concurrency=2, kinds="chat")
            _served_by(pool, pool.standing(keys[name])["connected"][0]["agentId"], 4)  # 7 of 10: trusted
        for name, key in keys.items():
            assert pool.standing(key)["trustScore"] >= trust.TRUSTED, name  # bought their way in
        with sqlite3.connect(pool.db_url.removeprefix("sqlite+aiosqlite:///")) as db:
            assert db.execute("SELECT count(*) FROM canary_references").fetchone() == (0,)

        token, honest = pool.new_provider("honest")
        localpool.admin(pool.env, "vouch", "--email", "honest@providers.example")
        pool.agent(llama, ["smollm2-135m"], token=token, max_concurrency=4, kinds="chat")  # chat canaries only

        def sybils_out() -> dict[str, dict[str, Any]] | None:
            """The sybils' standings once none is routable; until then, a round of consumer requests."""
            standings = {name: pool.standing(key) for name, key in keys.items()}
            if all(not standing["routable"] for standing in standings.values()):
                return standings
            asyncio.run(_round(pool))
            return None

        for name, standing in eventually(sybils_out, timeout=90, interval=0.5).items():
            assert not standing["routable"], (name, standing)
            assert trust.CANARY_FAILED in {item["kind"] for item in standing["evidence"]}, name
        finished: list[str] = []  # the model still answers everyone (once canaries leave the newcomer a slot)

        def three_finished() -> bool:
            finished.extend(str(agent) for agent, _ in asyncio.run(_round(pool)) if agent is not None)
            return len(finished) >= 3

        eventually(three_finished, timeout=60, interval=0.2)
        standing = pool.standing(honest)
        assert len(finished) >= 3 and set(finished) == {standing["connected"][0]["agentId"]}, finished
        assert standing["routable"] and standing["trustScore"] >= 50, standing
        assert {item["kind"] for item in standing["evidence"]} <= {trust.COMPLETED, trust.CANARY_PASSED}, standing
        with sqlite3.connect(pool.db_url.removeprefix("sqlite+aiosqlite:///")) as db:
            sources = {row[0] for row in db.execute("SELECT source FROM canary_references")}
        assert sources == {f"user:{_user_id(pool, 'honest@providers.example')}"}
    finally:
        pool.stop()


def _user_id(pool: Pool, email: str) -> int:
    with sqlite3.connect(pool.db_url.removeprefix("sqlite+aiosqlite:///")) as db:
        return int(db.execute("SELECT id FROM users WHERE email = ?", (email,)).fetchone()[0])
