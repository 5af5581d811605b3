"""Trust through real coordinator processes: canaries that look like consumer jobs at the agent's
socket, and a consumer's own jobs audited (inflated usage benches the agent, garbage is not billed).
The same against llama.cpp, with every kind of cheater, is tests/e2e/test_trust.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect

from coordinator.trust import scores as trust
from shared import protocol
from shared.protocol import Heartbeat, Hello, JobAssign, ModelOffer, Welcome
from tests.harness import Pool
from tests.waiting import eventually_async

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def verifying(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    harness = Pool(tmp_path_factory.mktemp("verifying"), canary_interval_seconds="0.2")
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


async def test_canaries_look_like_consumer_jobs_at_the_agent(verifying: Pool) -> None:
    """A websocket client in the agent's place records every job.assign it gets: one for a consumer
    request, the others verification jobs. Once the coordinator has seen a consumer's request, the
    canaries copy its shape: the same bytes but for the question asked."""
    pool = verifying
    url = pool.url.replace("http://", "ws://") + "/v1/agent/connect"
    offer = ModelOffer("smollm2-135m", "local-model", 100, 200)
    hello = Hello(protocol=protocol.PROTOCOL_VERSION, agent_version="t", models=[offer], max_concurrency=8)
    consumer = {  # not the order an SDK uses, nor the old canaries' limit and seed
        "model": "smollm2-135m",
        "stream": True,
        "messages": [{"role": "user", "content": "A consumer's question?"}],
        "stream_options": {"include_usage": True},
        "max_tokens": 40,
        "seed": 1,
        "temperature": 0,
    }
    assigned: list[JobAssign] = []
    decoder = protocol.coordinator_decoder()
    async with (
        connect(url, additional_headers={"Authorization": f"Bearer {pool.token}"}) as ws,
        httpx.AsyncClient(timeout=5, headers={"authorization": f"Bearer {pool.key}"}) as client,
    ):
        await ws.send(protocol.encode(hello))
        assert isinstance(decoder.decode(await ws.recv(decode=False)), Welcome)  # type: ignore[arg-type]
        request = asyncio.create_task(client.post(f"{pool.url}/v1/chat/completions", json=consumer))

        async def three_canaries_after_the_consumers_job() -> bool:
            """Heartbeat, take what arrives within 0.2 s, and say whether the consumer's job and three
            more have arrived."""
            await ws.send(protocol.encode(Heartbeat()))
            with contextlib.suppress(TimeoutError):
                message = decoder.decode(await asyncio.wait_for(ws.recv(decode=False), 0.2))  # type: ignore[arg-type]
                if isinstance(message, JobAssign):
                    assigned.append(message)
            bodies = [msgspec.json.decode(job.request) for job in assigned]
            return consumer in bodies and len(bodies) - bodies.index(consumer) > 3

        await eventually_async(three_canaries_after_the_consumers_job, interval=0)
        request.cancel()
    bodies = [msgspec.json.decode(job.request) for job in assigned]
    mine = next(job for job, body in zip(assigned, bodies, strict=True) if body == consumer)
    after = assigned[assigned.index(mine) + 1 :]  # sent once the consumer's request was seen
    assert len(after) >= 3, bodies
    for canary in after:
        body = msgspec.json.decode(canary.request)
        question = body["messages"][0]["content"]
        assert question != "A consumer's question?" and body["messages"][0]["role"] == "user"
        body["messages"][0]["content"] = consumer["messages"][0]["content"]  # type: ignore[index]
        assert json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() == mine.request
        assert canary.__struct_fields__ == mine.__struct_fields__
        assert (canary.model, canary.backend_model, canary.stream, canary.want_usage) == (
            mine.model,
            mine.backend_model,
            mine.stream,
            mine.want_usage,
        )
        assert re.fullmatch(r"job_[0-9a-f]{16}", canary.job_id) and re.fullmatch(r"job_[0-9a-f]{16}", mine.job_id)
        assert abs((canary.deadline - time.time()) - (mine.deadline - time.time())) < 5
    assert len({msgspec.json.decode(job.request)["messages"][0]["content"] for job in after}) >= 2  # a pool


def test_a_consumer_job_that_fails_the_audit_is_not_billed_and_benches_the_agent(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Without verification jobs: the consumer's own jobs are audited; inflated usage counts against
    the agent, output that fails the sanity checks is not billed."""
    pool = Pool(tmp_path_factory.mktemp("audited"), trust_threshold="40", new_agent_concurrency="2")
    pool.start()
    try:
        token, key = pool.new_provider("inflater")
        pool.agent(pool.standin(mode="inflate", chunks=20, interval_ms=10), ["smollm2-135m"], token=token)
        body = {"model": "smollm2-135m", "messages": QUESTION, "stream": True}
        with pool.client() as client:
            chunks = list(client.chat.completions.create(**body))  # type: ignore[call-overload]
        x_pool = (chunks[-1].model_extra or {})["x_pool"]
        assert x_pool["cost_usd"] == pytest.approx((5 * 0.1 + 20 * 0.2) / 1e6)  # 20 tokens, not the 40 reported
        standing = pool.standing(key)
        assert standing["routable"] is False and standing["evidence"][0]["kind"] == trust.USAGE_INFLATED
        assert standing["evidence"][0]["detail"] == "reported 40 completion tokens, counted 20"
        refused = pool.post({**body, "stream": False})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_capacity"
        pool.stop_agents()

        token, key = pool.new_provider("babbler")
        pool.agent(pool.standin(mode="garbage", chunks=20, interval_ms=10), ["smollm2-135m"], token=token)
        reply = pool.post({"model": "smollm2-135m", "messages": QUESTION})
        assert reply.json()["choices"][0]["message"]["content"].startswith("zzz zzz")
        assert reply.json()["x_pool"]["cost_usd"] == 0  # garbage is not billed...
        # ...but a consumer may have asked for it: only verification jobs count it against the agent
        standing = pool.standing(key)
        assert [item["kind"] for item in standing["evidence"]] == [trust.COMPLETED] and standing["routable"]
    finally:
        pool.stop()
