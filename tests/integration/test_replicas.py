"""Coordinator replicas on one PostgreSQL database and one Redis (real processes, real Redis):
a key's rate limit holds for the whole pool, a revocation on one replica is refused by the others
within a second (pushed, not waited out), and a replica whose Redis goes away keeps serving on its
own limits, says it is degraded, and uses Redis again once it is back.

Each module run has a Redis key prefix of its own, so it shares the server with nothing."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from coordinator.money.metering import Price, prompt_bound
from scripts import localpool
from scripts.localpool import Proc
from tests.conftest import redis_url
from tests.harness import Pool, agents_at, key_id_of
from tests.ledger_checks import books_of
from tests.waiting import eventually

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, own_database: str, prefix: str
) -> Iterator[tuple[Pool, Proc, str]]:
    """Replica A (the harness's coordinator, with one agent) and replica B (with one agent)."""
    workdir = tmp_path_factory.mktemp("replicas")
    a = Pool(workdir, db_url=own_database, redis_url=redis_url(), redis_prefix=prefix)
    a.start()
    port = localpool.free_port()
    b = localpool.start_coordinator(port, a.env, workdir, name="coordinator-b")
    b_url = f"http://127.0.0.1:{port}"
    try:
        a.agent(a.standin(), ["smollm2-135m"], max_concurrency=32)
        a.agent(a.standin(), ["smollm2-135m"], coordinator=b_url, wait=False, max_concurrency=32)
        eventually(lambda: agents_at(b_url) == 1, timeout=15)
        yield a, b, b_url
    finally:
        a.stop()
        b.stop()


def test_a_keys_rate_limit_holds_across_replicas(replicas: tuple[Pool, Proc, str], own_database: str) -> None:
    a, _, b_url = replicas
    key = localpool.admin(a.env, "create-key", "--email", "consumer@example.com")
    key_id = asyncio.run(key_id_of(own_database, key))
    assert key_id, "the new key's id"
    localpool.admin(a.env, "set-key-limits", "--key-id", str(key_id), "--rpm", "20")

    async def spread(count: int) -> list[int]:
        """``count`` requests at once, every other one to each replica."""
        async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
            body = {"model": "smollm2-135m", "messages": MSG}
            responses = await asyncio.gather(
                *(client.post(f"{(a.url, b_url)[i % 2]}/v1/chat/completions", json=body) for i in range(count))
            )
        return [response.status_code for response in responses]

    started = time.monotonic()
    statuses = asyncio.run(spread(40))
    elapsed = time.monotonic() - started
    admitted = statuses.count(200)
    # 20 a minute is one more every 3 s: a run this short may see one refill
    assert 20 <= admitted <= 20 + int(elapsed / 3) + 1, (statuses, elapsed)
    assert statuses.count(429) == 40 - admitted, statuses  # the rest refused by the limit, none failed
    print(f"\n40 requests over 2 replicas in {elapsed:.2f} s against 20 RPM: {admitted} admitted")


def _new_credential(pool: Pool, kind: str) -> tuple[dict[str, str], dict[str, object]]:
    """A new user's portal session headers, and a new credential of theirs (``tokens``: a consumer
    key, ``agent-tokens``: an agent token) as the portal returns it."""
    session = pool.sign_up(f"user-{secrets.token_hex(3)}@example.com", "correct horse battery staple")
    portal = {"authorization": f"Bearer {session['token']}"}
    created = httpx.post(f"{pool.url}/v1/{kind}", json={"displayName": "soon gone"}, headers=portal, timeout=10)
    assert created.status_code == 201, created.text
    return portal, dict(created.json())


def test_a_revoked_key_is_refused_by_every_replica_within_a_second(replicas: tuple[Pool, Proc, str]) -> None:
    a, _, b_url = replicas
    portal, created = _new_credential(a, "tokens")
    key = created["token"]
    consumer = {"authorization": f"Bearer {key}"}
    assert httpx.get(f"{b_url}/v1/credits", headers=consumer, timeout=10).status_code == 200  # B has it cached
    revoked = httpx.delete(f"{a.url}/v1/tokens/{created['id']}", headers=portal, timeout=10)
    assert revoked.status_code == 204
    at = time.monotonic()
    eventually(
        lambda: httpx.get(f"{b_url}/v1/credits", headers=consumer, timeout=10).status_code == 401,
        timeout=1.0,
        interval=0.01,
    )
    print(f"\nrevoked on A, refused by B {1000 * (time.monotonic() - at):.0f} ms later")


def test_a_revoked_agent_token_is_dropped_by_the_replica_holding_its_agent(replicas: tuple[Pool, Proc, str]) -> None:
    a, _, b_url = replicas
    portal, created = _new_credential(a, "agent-tokens")
    before = agents_at(b_url)
    agent = a.agent(a.standin(), ["smollm2-135m"], token=str(created["token"]), coordinator=b_url, wait=False)
    eventually(lambda: agents_at(b_url) == before + 1, timeout=15)
    assert httpx.delete(f"{a.url}/v1/agent-tokens/{created['id']}", headers=portal, timeout=10).status_code == 204
    at = time.monotonic()
    eventually(lambda: agents_at(b_url) == before, timeout=1.0, interval=0.01)
    print(f"\nagent token revoked on A, its agent dropped by B {1000 * (time.monotonic() - at):.0f} ms later")
    eventually(lambda: not agent.alive(), timeout=15)  # it was told why, and gave up


def test_failed_authentications_are_counted_over_the_pool(tmp_path: Path, pg_url: str, prefix: str) -> None:
    """10 a minute per address: 6 wrong keys on each of two replicas block the address on both
    (alone, each would have seen 6, and let it go on)."""
    a = Pool(
        tmp_path, db_url=pg_url, redis_url=redis_url(), redis_prefix=f"{prefix}auth:", auth_failures_per_minute="10"
    )
    a.start()
    port = localpool.free_port()
    b = localpool.start_coordinator(port, a.env, tmp_path, name="coordinator-b")
    urls = (a.url, f"http://127.0.0.1:{port}")
    try:
        wrong = {"authorization": "Bearer pool_live_" + "x" * 49}
        statuses = [httpx.get(f"{urls[i % 2]}/v1/credits", headers=wrong, timeout=10).status_code for i in range(12)]
        assert statuses.count(401) >= 10 and set(statuses) <= {401, 429}, statuses
        right = {"authorization": f"Bearer {a.key}"}
        for url in urls:  # the address is blocked everywhere, whatever key it brings now
            refused = eventually(
                lambda url=url: (
                    (r := httpx.get(f"{url}/v1/credits", headers=right, timeout=10)).status_code == 429 and r
                ),
                timeout=1.0,
                interval=0.02,
            )
            assert int(refused.headers["retry-after"]) >= 1
    finally:
        a.stop()
        b.stop()


def test_a_replica_without_its_redis_keeps_serving_and_says_so(tmp_path: Path, pg_url: str) -> None:
    """A Redis of its own (Debian's redis-server on a free port), stopped and started again."""
    port = localpool.free_port()

    def start_redis() -> subprocess.Popen[bytes]:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
        )
        eventually(lambda: _pings(port), timeout=10)
        return server

    server = start_redis()
    pool = Pool(tmp_path, db_url=pg_url, redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix="solo:")
    try:
        pool.start()
        pool.agent(pool.standin(), ["smollm2-135m"])
        assert httpx.get(f"{pool.url}/readyz", timeout=5).json()["checks"]["redis"] == "ok"
        server.terminate()
        server.wait(10)
        ready = httpx.get(f"{pool.url}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["checks"]["redis"].startswith("degraded"), ready.text
        served = pool.post({"model": "smollm2-135m", "messages": MSG})
        assert served.status_code == 200, served.text  # its own agent, its own rate limits
        assert "x-ratelimit-remaining-requests" in served.headers
        server = start_redis()
        eventually(lambda: httpx.get(f"{pool.url}/readyz", timeout=5).json()["checks"]["redis"] == "ok", timeout=10)
        assert pool.post({"model": "smollm2-135m", "messages": MSG}).status_code == 200
        assert _keys(port, "solo:limits:*"), "the limits are in Redis again"
    finally:
        pool.stop()
        server.terminate()
        server.wait(10)


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _keys(port: int, pattern: str) -> list[bytes]:
    return list(redis.Redis(port=port, socket_timeout=0.5).scan_iter(pattern))


def _hold(body: bytes, price_in: int, price_out: int, max_tokens: int) -> int:
    """What a request with ``body`` holds, by the pool's own formula (nano-USD)."""
    return Price(price_in, price_out).cost(prompt_bound(body), max_tokens)


def test_credit_for_exactly_ten_requests_serves_ten_over_three_replicas(
    tmp_path: Path, pg_url: str, prefix: str
) -> None:
    """100 requests at once, spread over 3 replicas (each with its own agent, streams slow enough
    to overlap), from a consumer whose balance covers exactly 10 holds: exactly 10 are served, the
    rest get 402, and the books balance once every lease is closed."""
    body = msgspec.json.encode({"model": "smollm2-135m", "messages": MSG, "max_tokens": 10, "stream": True})
    hold = _hold(body, 100, 200, 10)  # the agents ask 0.1 / 0.2 USD per 1M tokens: 100 / 200 nano
    a = Pool(
        tmp_path,
        db_url=pg_url,
        credits_usd=str(Decimal(10 * hold) / 10**9),
        redis_url=redis_url(),
        redis_prefix=f"{prefix}money:",
    )
    a.start()
    others = []
    try:
        urls = [a.url]
        for name in ("b", "c"):
            port = localpool.free_port()
            others.append(localpool.start_coordinator(port, a.env, tmp_path, name=f"coordinator-{name}"))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            a.agent(
                a.standin(chunks=10, interval_ms=100), ["smollm2-135m"], coordinator=url, wait=False, max_concurrency=40
            )
        for url in urls:
            eventually(lambda url=url: agents_at(url) == 1, timeout=15)

        async def spread() -> list[httpx.Response]:
            headers = {"authorization": f"Bearer {a.key}", "content-type": "application/json"}
            async with httpx.AsyncClient(timeout=60, headers=headers) as client:
                return list(
                    await asyncio.gather(
                        *(client.post(f"{urls[i % 3]}/v1/chat/completions", content=body) for i in range(100))
                    )
                )

        responses = asyncio.run(spread())
        statuses = [response.status_code for response in responses]
        assert statuses.count(200) == 10, statuses
        by_replica = [sum(1 for i, status in enumerate(statuses) if status == 200 and i % 3 == r) for r in range(3)]
        print(f"\n100 requests over 3 replicas, credit for 10: served {by_replica} (by replica)")
        refused = [response.json()["error"]["code"] for response in responses if response.status_code != 200]
        assert set(refused) == {"insufficient_credits"}, refused
        spent = sum(_stream_cost(response.text) for response in responses if response.status_code == 200)
        assert 0 < spent <= 10 * hold
        eventually(lambda: asyncio.run(books_of(pg_url))[0] == 0, timeout=20, interval=0.5)  # every lease closed
        assert asyncio.run(books_of(pg_url))[1] == []
        left = httpx.get(f"{a.url}/v1/credits", headers={"authorization": f"Bearer {a.key}"}, timeout=10).json()
        assert round(left["balanceUsd"] * 10**9) == 10 * hold - spent  # charged what was served, once
    finally:
        a.stop()
        for proc in others:
            proc.stop()


def _stream_cost(text: str) -> int:
    """The nano-USD a stream's ``x_pool`` says it cost."""
    lines = [line for line in text.splitlines() if '"x_pool"' in line]
    return round(float(msgspec.json.decode(lines[-1][6:])["x_pool"]["cost_usd"]) * 10**9)


def test_a_replica_killed_mid_stream_leaves_the_books_whole(tmp_path: Path, pg_url: str, prefix: str) -> None:
    """SIGKILL on replica B while it streams: the consumer's stream ends (it does not hang), B's
    credit lease is released by A's sweep, nothing is charged for the cut stream, the agent moves
    to A and serves there, and the books balance."""
    a = Pool(
        tmp_path,
        db_url=pg_url,
        redis_url=redis_url(),
        redis_prefix=f"{prefix}kill:",
        instance_lease_seconds="2",  # a silent process's holds go after 2 s
        hold_sweep_interval="0.5",
    )
    a.start()
    port = localpool.free_port()
    b = localpool.start_coordinator(port, a.env, tmp_path, name="coordinator-b")
    b_url = f"http://127.0.0.1:{port}"
    try:
        slow = a.standin(chunks=50, interval_ms=100)  # a 5 s stream
        agent = a.agent(slow, ["smollm2-135m"], coordinator=f"{b_url},{a.url}", wait=False)
        eventually(lambda: agents_at(b_url) == 1, timeout=15)
        credits = {"authorization": f"Bearer {a.key}"}
        before = httpx.get(f"{a.url}/v1/credits", headers=credits, timeout=10).json()["balanceUsd"]
        body = {"model": "smollm2-135m", "messages": MSG, "stream": True}
        received: list[str] = []
        started = time.monotonic()
        url = f"{b_url}/v1/chat/completions"
        with (
            pytest.raises(httpx.HTTPError),  # the connection goes with the process
            httpx.stream("POST", url, json=body, headers=credits, timeout=10) as reply,
        ):
            for line in reply.iter_lines():
                received.append(line)
                if len(received) == 6:  # a few chunks in: kill B
                    b.popen.kill()
        assert len(received) >= 6 and time.monotonic() - started < 10  # it ended, it did not hang
        eventually(lambda: agents_at(a.url) == 1, timeout=10, explain=lambda: agent.output()[-1500:])
        eventually(lambda: asyncio.run(books_of(pg_url))[0] == 0, timeout=15, interval=0.5)  # B's lease released
        after = httpx.get(f"{a.url}/v1/credits", headers=credits, timeout=10).json()["balanceUsd"]
        assert after == before  # the cut stream was never charged, and nothing was lost
        served = a.post({"model": "smollm2-135m", "messages": MSG})
        assert served.status_code == 200, served.text
        assert asyncio.run(books_of(pg_url))[1] == []
    finally:
        a.stop()
        b.stop()
