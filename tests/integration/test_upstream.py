"""Platform upstream fallback (a loopback stand-in plays the paid upstream), and a coordinator on
PostgreSQL serving end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts import localpool
from tests.harness import Pool, agents_at, last_request, with_upstream
from tests.waiting import eventually

MSG = [{"role": "user", "content": "hi"}]
SLUG = "smollm2-135m"


@pytest.fixture(scope="module")
def upstream_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    workdir = tmp_path_factory.mktemp("upstream")
    harness = with_upstream(
        workdir, "gemma-3-270m=upstream-gemma,smollm2-135m=upstream-smol", upstream_api_key="sk-platform"
    )
    failing_port = localpool.free_port()
    harness.backends.append(localpool.start_standin(failing_port, workdir, name="failing", mode="fail"))
    harness.start()
    harness.extra["failing"] = f"http://127.0.0.1:{failing_port}/v1"
    try:
        yield harness
    finally:
        harness.stop()


def test_no_agent_falls_back_to_upstream(upstream_pool: Pool) -> None:
    pool = upstream_pool
    client = pool.client()
    reply = client.chat.completions.create(model="gemma-3-270m", messages=MSG)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "tok0 tok1 tok2"
    x_pool = (reply.model_extra or {})["x_pool"]
    assert x_pool["fallback"] is True and x_pool["provider"] == "platform" and x_pool["agent"] is None
    seen = last_request(pool.extra["upstream"])
    assert seen["model"] == "upstream-gemma"

    chunks = list(
        client.chat.completions.create(
            model="gemma-3-270m",
            messages=MSG,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 "
    assert chunks[-1].usage is not None and (chunks[-1].model_extra or {})["x_pool"]["fallback"] is True

    status = pool.status()
    assert status["fallbackRate"] > 0  # type: ignore[operator]
    assert {m["modelSlug"] for m in status["byModel"]} >= {"gemma-3-270m", "smollm2-135m"}  # type: ignore[union-attr]
    gemma = next(m for m in status["byModel"] if m["modelSlug"] == "gemma-3-270m")  # type: ignore[union-attr]
    assert gemma["avgLatencyP95Ms"] is not None and gemma["providerCount"] == 0


def test_agents_first_upstream_when_full(upstream_pool: Pool) -> None:
    pool = upstream_pool
    pool.agent(pool.standin(chunks=2), ["smollm2-135m"])
    reply = pool.post({"model": "smollm2-135m", "messages": MSG}).json()
    assert reply["x_pool"]["fallback"] is False
    assert reply["choices"][0]["message"]["content"] == "tok0 tok1"


def _charged(reply: dict[str, Any]) -> tuple[int, int, float]:
    usage = reply["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"], float(reply["x_pool"]["cost_usd"])


def test_an_unpriced_upstream_before_any_agent_charges_the_directorys_ceiling(upstream_pool: Pool) -> None:
    """No POOL_UPSTREAM_PRICE_*: never free. Gemma never had an agent here: its ceiling (the
    defaults, $50 in and $200 out per 1M tokens) is the price."""
    pool = upstream_pool
    reply = pool.post({"model": "gemma-3-270m", "messages": MSG}).json()
    prompt, completion, cost = _charged(reply)
    assert reply["x_pool"]["fallback"] is True and completion > 0
    assert cost == pytest.approx((prompt * 50 + completion * 200) / 1e6)
    log = (pool.dir / "coordinator.log").read_text()
    assert "fallback requests are charged each model's pool price" in log


def test_upstream_failure_is_502(upstream_pool: Pool) -> None:
    pool = upstream_pool
    pool.restart(upstream_base_url=pool.extra["failing"])
    for stream in (False, True):
        response = pool.post({"model": "gemma-3-270m", "messages": MSG, "stream": stream})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "provider_error"
        assert "stand-in failure" in response.json()["error"]["message"]
        # The failed request is logged as the fallback's, by the platform, under the model asked for.
        generation = eventually(lambda rid=response.headers["x-request-id"]: pool.generation(rid))
        assert generation["fallback"] is True and generation["provider"] == "platform"
        assert generation["model"] == "gemma-3-270m" and generation["status"] == 502


def test_coordinator_on_postgresql_serves_end_to_end(pg_url: str, tmp_path: Path) -> None:
    pool = Pool(tmp_path, db_url=pg_url)
    pool.start()  # `serve` applies the migrations on PostgreSQL; keys live there
    try:
        pool.agent(pool.standin(chunks=2), ["smollm2-135m"])
        reply = pool.post({"model": "smollm2-135m", "messages": MSG})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "tok0 tok1"
        assert pool.post({"model": "smollm2-135m", "messages": MSG}, key="pool_live_x").status_code == 401
    finally:
        pool.stop()


@pytest.fixture
def priced_by_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    harness = with_upstream(tmp_path_factory.mktemp("pool-priced"), "smollm2-135m=upstream-smol")
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def test_an_unpriced_upstream_charges_the_median_offer_one_per_provider(priced_by_pool: Pool) -> None:
    """Three providers at $0.1/$0.2, $1/$2 and $10/$20 per 1M tokens, and a fourth with three
    agents at $0.001: counted once, the swarm cannot pull the price down to its own (the median
    of every agent would be $0.001). Only trusted agents count: while they are new, the price is
    the ceiling. Once their jobs have made them trusted, the fallback charges $0.1/$0.2, and keeps
    it once the agents are gone."""
    pool = priced_by_pool
    backend = pool.standin(chunks=4, interval_ms=3)  # a plausible speed: their jobs earn trust
    agents: list[str] = []
    for name, price_in, price_out, count in (
        ("cheap", "0.1", "0.2", 1),
        ("middle", "1", "2", 1),
        ("dear", "10", "20", 1),
        ("swarm", "0.001", "0.001", 3),
    ):
        token, key = pool.new_provider(name)
        for _ in range(count):
            pool.agent(backend, [SLUG], token=token, price_in=price_in, price_out=price_out)
        agents.append(pool.standing(key)["connected"][0]["agentId"])

    def platform() -> dict[str, Any]:
        body = {"model": SLUG, "messages": MSG, "provider": {"only": ["platform"]}}
        reply = pool.post(body).json()
        assert reply["x_pool"]["fallback"] is True, reply
        return dict(reply)

    def at_median() -> bool:
        prompt, completion, cost = _charged(platform())
        return cost == pytest.approx((prompt * 0.1 + completion * 0.2) / 1e6)

    prompt, completion, cost = _charged(platform())
    assert cost == pytest.approx((prompt * 50 + completion * 200) / 1e6)  # new agents: the ceiling
    for agent in agents:  # a dozen jobs each make a token trusted (70)
        for _ in range(12):
            assert pool.post({"model": SLUG, "messages": MSG, "provider": {"only": [agent]}}).status_code == 200
    eventually(at_median, timeout=15, interval=0.5)  # trust is applied every 2 s, prices every second
    pool.stop_agents()
    eventually(lambda: agents_at(pool.url) == 0, timeout=10)
    time.sleep(1.2)  # a repricing with no agent: the last median stays
    assert at_median()
