"""What the request path was made faster with still does what it did: a non-streamed reply in one
frame only to coordinators that take it, status statistics added up in slots, and keys looked up
ahead of their expiry without keeping a revoked key alive."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from coordinator import keys, stats
from coordinator.accounts import Principal
from coordinator.auth import SecretCache
from provider_agent.backends import Backend
from provider_agent.config import AgentConfig, ModelSpec
from provider_agent.runner import Runner
from shared.protocol import JobAssign, JobChunk, JobDone, Message


async def _run_job(backend_url: str, *, stream: bool, whole_replies: bool) -> list[Message]:
    config = AgentConfig(
        coordinator_url="ws://127.0.0.1:9/v1/agent/connect",
        token="unused",
        backend_url=f"{backend_url}/v1",
        models=(ModelSpec("smollm2-135m", "smollm2-135m"),),
        price_in=1,
        price_out=1,
    )
    backend = Backend(config)
    runner = Runner(backend, 4)
    runner.whole_replies = whole_replies
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    request = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}], "stream": stream}
    body = json.dumps({**request, "temperature": 0, "max_tokens": 8}).encode()
    assign = JobAssign("job_1", "smollm2-135m", "smollm2-135m", body, stream, False, time.time() + 30)
    try:
        await runner.start(assign, send)
        assert await runner.wait_idle(60)
    finally:
        await backend.aclose()
    return sent


def _answer(reply: bytes) -> str:
    content: str = json.loads(reply)["choices"][0]["message"]["content"]
    return content


@pytest.mark.slow
async def test_a_non_streamed_reply_goes_whole_only_to_a_coordinator_that_takes_it(llama: str) -> None:
    whole = await _run_job(llama, stream=False, whole_replies=True)
    assert [type(m) for m in whole] == [JobDone]
    assert isinstance(whole[0], JobDone) and len(whole[0].tail) == 1
    assert _answer(whole[0].tail[0])  # the backend's whole chat.completion

    apart = await _run_job(llama, stream=False, whole_replies=False)  # an older coordinator
    assert [type(m) for m in apart] == [JobChunk, JobDone]
    assert isinstance(apart[0], JobChunk) and _answer(apart[0].data) == _answer(whole[0].tail[0])
    assert isinstance(apart[1], JobDone) and apart[1].tail == []

    streamed = await _run_job(llama, stream=True, whole_replies=True)  # streams are never held back
    assert [type(m) for m in streamed[:-1]] == [JobChunk] * (len(streamed) - 1)
    assert isinstance(streamed[-1], JobDone)


def test_request_stats_add_up_in_slots_and_forget_old_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(stats.time, "monotonic", lambda: clock[0])
    window = stats.RequestStats(60)
    for ms in range(1, 101):  # 1..100 ms, served by agents
        window.record("a", float(ms), fallback=False, ok=True)
    window.record("b", 500.0, fallback=True, ok=True)
    window.record("b", 9000.0, fallback=False, ok=False)  # failed: counted, but not in latency or fallbacks
    now = window.recent()
    assert (now.pool.requests, now.pool.served, now.pool.fallbacks) == (102, 101, 1)
    assert now.fallback_rate == pytest.approx(1 / 101)
    p95 = now.models["a"].p95()
    assert p95 is not None and 95 <= p95 <= 95 * 1.1  # the upper edge of its 10 % bucket
    assert now.models["b"].p95() == 500.0  # capped by the largest latency

    clock[0] += 30  # a later slot, still inside the window
    window.record("a", 5.0, fallback=False, ok=True)
    assert window.recent().pool.requests == 103
    clock[0] += 45  # the first slot has left the window, the second has not
    later = window.recent()
    assert (later.pool.requests, set(later.models)) == (1, {"a"})
    clock[0] += 60
    assert window.recent().pool.requests == 0


async def test_a_key_in_use_is_looked_up_ahead_and_still_expires(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    answers: list[Principal | None] = [Principal(user_id=1, credential_id=7)]
    lookups: list[str] = []

    async def lookup(_: AsyncSession, secret_digest: str) -> Principal | None:
        lookups.append(secret_digest)
        return answers[-1]

    cache = SecretCache(async_sessionmaker(engine), keys.CONSUMER_PREFIX, lookup, ttl=1.0)
    header = f"Bearer {keys.generate(keys.CONSUMER_PREFIX)}"
    try:
        assert await cache.resolve(header) == answers[0]
        assert await cache.resolve(header) == answers[0] and len(lookups) == 1  # cached
        await asyncio.sleep(0.6)  # past half the TTL: answered from the cache, looked up behind it
        answers.append(None)  # revoked meanwhile
        assert await cache.resolve(header) == answers[0]
        await asyncio.sleep(0.05)
        assert len(lookups) == 2
        assert await cache.resolve(header) is None  # the lookup ahead saw the revocation
        await asyncio.sleep(1.1)  # unused for a whole TTL: the entry expired, the request waits for a lookup
        answers.append(Principal(user_id=1, credential_id=8))
        assert await cache.resolve(header) == answers[-1] and len(lookups) == 3
    finally:
        await engine.dispose()
