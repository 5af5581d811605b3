"""Three coordinator replicas on one PostgreSQL database and one Redis are one pool (real processes,
real Redis, stand-in backends behind real agents): each replica sees every agent, a consumer on one
replica is served by an agent connected to another (through the OpenAI SDK, stream and not), two
replicas racing for an agent's last slot never double-book it, a consumer leaving frees the slot on
the other replica, and a replica killed mid-stream ends its relayed stream with an error and leaves
the other replicas' mirrors within seconds.

Agents: on A, one for ``smollm2-135m`` and a slow one for ``gemma-3-270m`` with one slot; on B, one
for ``smollm2-135m``; on C, a slow one for ``qwen2.5-7b``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from scripts import localpool
from scripts.localpool import Proc
from tests.conftest import redis_url
from tests.harness import Pool, agents_at
from tests.ledger_checks import books_of
from tests.waiting import eventually

MSG = [{"role": "user", "content": "hi"}]
SLOW_CHUNKS, SLOW_INTERVAL_MS = 8, 400  # a job of about 3 s on the one-slot agent


class Trio:
    def __init__(self, a: Pool, b: Proc, b_url: str, c: Proc, c_url: str) -> None:
        self.a, self.b, self.b_url, self.c, self.c_url = a, b, b_url, c, c_url

    @property
    def urls(self) -> list[str]:
        return [self.a.url, self.b_url, self.c_url]

    def client(self, url: str) -> OpenAI:
        return OpenAI(base_url=f"{url}/v1", api_key=self.a.key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory, own_database: str, prefix: str) -> Iterator[Trio]:
    workdir = tmp_path_factory.mktemp("one-pool")
    a = Pool(workdir, db_url=own_database, redis_url=redis_url(), redis_prefix=prefix)
    a.start()
    others = []
    for name in ("b", "c"):
        port = localpool.free_port()
        env = {**a.env, "POOL_REPLICA_NAME": name}
        others.append((localpool.start_coordinator(port, env, workdir, name=f"coordinator-{name}"), port))
    (b, b_port), (c, c_port) = others
    trio = Trio(a, b, f"http://127.0.0.1:{b_port}", c, f"http://127.0.0.1:{c_port}")
    try:
        a.agent(a.standin(), ["smollm2-135m"], max_concurrency=8)
        slow = a.standin(chunks=SLOW_CHUNKS, interval_ms=SLOW_INTERVAL_MS)
        a.agent(slow, ["gemma-3-270m"], max_concurrency=1)
        for url, models, backend in (
            (trio.b_url, ["smollm2-135m"], a.standin()),
            (trio.c_url, ["qwen2.5-7b"], a.standin(chunks=60, interval_ms=200)),
        ):
            a.agent(backend, models, coordinator=url, wait=False, max_concurrency=4)
            eventually(lambda url=url: agents_at(url) == 1, timeout=15)
        for url in trio.urls:  # every replica's mirror has all four
            eventually(lambda url=url: _models(url) >= {"smollm2-135m", "gemma-3-270m", "qwen2.5-7b"}, timeout=10)
        yield trio
    finally:
        a.stop()
        b.stop()
        c.stop()


def _model_list(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/v1/models", timeout=5).json()["data"])


def _models(url: str) -> set[str]:
    return {entry["id"] for entry in _model_list(url) if entry["providerCount"]}


def test_every_replica_shows_the_same_pool(trio: Trio) -> None:
    lists = [_model_list(url) for url in trio.urls]
    assert lists[0] == lists[1] == lists[2]
    counts = {entry["id"]: entry["providerCount"] for entry in lists[0]}
    assert counts["smollm2-135m"] == 1 and counts["gemma-3-270m"] == 1 and counts["qwen2.5-7b"] == 1  # one provider

    def same_status() -> bool:
        statuses = [httpx.get(f"{url}/v1/pool/status", timeout=5).json() for url in trio.urls]
        return statuses[0] == statuses[1] == statuses[2] and statuses[0]["modelsAvailable"] >= 3

    eventually(same_status, timeout=5, explain=lambda: "replicas disagree on /v1/pool/status")
    metrics = httpx.get(f"{trio.b_url}/metrics", timeout=5).text  # B holds one agent, mirrors A's two and C's one
    assert "pool_agents_connected 1.0" in metrics and "pool_agents_elsewhere 3.0" in metrics


def test_a_consumer_on_b_is_served_by_an_agent_on_a(trio: Trio) -> None:
    client = trio.client(trio.b_url)
    reply = client.chat.completions.create(model="gemma-3-270m", messages=MSG)  # type: ignore[arg-type]
    x_pool = (reply.model_extra or {})["x_pool"]
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens > 0
    assert x_pool["fallback"] is False and x_pool["replica"].startswith("b-")
    assert x_pool["agent_replica"] != x_pool["replica"]  # held by A
    assert reply.model == "gemma-3-270m" and reply.id == x_pool["request_id"]  # the pool's id, not the agent's

    stream = client.chat.completions.create(
        model="gemma-3-270m",
        messages=MSG,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == SLOW_CHUNKS  # every chunk, in order, relayed from A
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    x_pool = (chunks[-1].model_extra or {})["x_pool"]
    assert x_pool["replica"].startswith("b-") and x_pool["agent_replica"] != x_pool["replica"]
    # the replica that served paid the provider: the books balance whoever held the agent
    assert asyncio.run(books_of(trio.a.env["POOL_DATABASE_URL"]))[1] == []


def test_two_replicas_racing_for_the_last_slot_never_double_book_it(trio: Trio) -> None:
    """The gemma agent has one slot: a request on A and one on B at the same moment. A decides: one
    is served, the other is refused at once (no other agent, no upstream: 503), never both."""

    async def race() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {trio.a.key}"}) as http:

            async def one(url: str) -> tuple[int, float]:
                started = time.monotonic()
                body = {"model": "gemma-3-270m", "messages": MSG}
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                return response.status_code, time.monotonic() - started

            return list(await asyncio.gather(one(trio.a.url), one(trio.b_url)))

    for _ in range(3):
        results = asyncio.run(race())
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 503], results
        refused = next(seconds for status, seconds in results if status == 503)
        assert refused < 2.0, results  # refused at once, not after the other job's ~3 s


def test_a_consumer_leaving_on_b_frees_the_slot_on_a(trio: Trio) -> None:
    headers = {"authorization": f"Bearer {trio.a.key}"}
    body = {"model": "gemma-3-270m", "messages": MSG, "stream": True}
    with httpx.stream("POST", f"{trio.b_url}/v1/chat/completions", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # the first chunk, then the consumer goes
    left = time.monotonic()
    while True:  # the one slot is taken until the job on A is cancelled (else for ~3 s more)
        tried = time.monotonic() - left
        if trio.a.post({"model": "gemma-3-270m", "messages": MSG}).status_code == 200:
            break
        assert tried < 1.0, "the slot stayed taken: the job on A was not cancelled"
        time.sleep(0.02)
    print(f"\nconsumer left B, the agent's slot on A was free again {tried * 1000:.0f} ms later")
    gemma_agent = trio.a.agents[1]  # on A: its log names B's request (the id travels with the job)
    eventually(lambda: f'"request_id":"{request_id}"' in gemma_agent.output().replace(" ", ""), timeout=5)


def test_a_killed_replica_ends_its_relayed_streams_and_leaves_the_mirrors(trio: Trio) -> None:
    headers = {"authorization": f"Bearer {trio.a.key}"}
    body = {"model": "qwen2.5-7b", "messages": MSG, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", f"{trio.b_url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        killed = 0.0
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if len(lines) == 2:
                trio.c.popen.kill()  # SIGKILL: no drain, no goodbye
                killed = time.monotonic()
    ended = time.monotonic() - killed
    last = json.loads((lines[-2] if lines[-1] == "data: [DONE]" else lines[-1]).removeprefix("data: "))
    assert last["error"]["code"] == "provider_error", lines[-3:]  # an error event, not a silent end
    assert ended < 15, ended  # within the mirror's TTL and a beat, not the job's deadline
    for url in (trio.a.url, trio.b_url):
        eventually(lambda url=url: "qwen2.5-7b" not in _models(url), timeout=10)
    print(f"\nC killed mid-stream: B's consumer had an error event {ended:.2f} s later")
    assert asyncio.run(books_of(trio.a.env["POOL_DATABASE_URL"]))[1] == []
