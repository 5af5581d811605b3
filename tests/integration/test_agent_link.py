"""The agent websocket under abuse, and the pool's behaviour when agents fail, vanish or drain.
Real coordinator and agent processes, real sockets, a stand-in backend."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scripts import localpool
from scripts.localpool import ROOT
from shared import protocol
from shared.protocol import Hello, ModelOffer, Reject, Welcome
from tests.harness import Pool
from tests.hostile import HostileAgent
from tests.waiting import eventually, eventually_async

MSG = [{"role": "user", "content": "hi"}]
BODY = {"model": "smollm2-135m", "messages": MSG}


def _ws_url(pool: Pool) -> str:
    return pool.url.replace("http://", "ws://") + "/v1/agent/connect"


def _hello(version: int = protocol.PROTOCOL_VERSION) -> bytes:
    return protocol.encode(
        Hello(protocol=version, agent_version="test", models=[ModelOffer("smollm2-135m", "x", 1, 1)], max_concurrency=1)
    )


async def _session(pool: Pool, *frames: bytes | str) -> tuple[int | None, str]:
    """Connect with a valid token, say hello, send ``frames``; return the close code and reason."""
    async with connect(_ws_url(pool), additional_headers={"Authorization": f"Bearer {pool.token}"}) as ws:
        await ws.send(_hello())
        welcome = protocol.coordinator_decoder().decode(await ws.recv(decode=False))  # type: ignore[arg-type]
        assert isinstance(welcome, Welcome)
        try:
            for frame in frames:
                await ws.send(frame)
            await asyncio.wait_for(ws.recv(), 1.0)  # less than 3 missed 0.5 s heartbeats
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd else None), (exc.rcvd.reason if exc.rcvd else "")
        except TimeoutError:
            return None, "still open"
        return None, "unexpected message"


async def _received(client: httpx.AsyncClient, backend: str) -> bool:
    """Whether the stand-in at ``backend`` has received the test's request (it serves back the last
    one; the agent's probes at its start are requests too)."""
    return bool((await client.get(f"{backend}/_last")).json().get("messages") == BODY["messages"])


def _serving(pool: Pool) -> None:
    response = pool.post(BODY)
    assert response.status_code == 200, response.text


@pytest.fixture
def served(pool: Pool) -> None:
    pool.agent(pool.standin(chunks=3), ["smollm2-135m"])


async def test_bad_agent_token_is_refused_before_upgrade(pool: Pool, served: None) -> None:
    for token in ("pool_agent_garbage", pool.key, ""):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(_ws_url(pool), additional_headers={"Authorization": f"Bearer {token}"}):
                pass
        assert refused.value.response.status_code == 401
        assert b"invalid_api_key" in (refused.value.response.body or b"")
    assert pool.agent_count() == 1  # nothing registered
    _serving(pool)


def test_agent_cli_with_bad_token_exits_with_reason(pool: Pool) -> None:
    proc = pool.agent(pool.standin(), ["smollm2-135m"], wait=False, token="pool_agent_wrong")
    assert proc.popen.wait(20) == 1
    assert "refused the agent token" in proc.output()
    assert pool.agent_count() == 0


def test_agent_cli_with_unreachable_backend_exits_with_reason(pool: Pool) -> None:
    proc = pool.agent("http://127.0.0.1:9", ["smollm2-135m"], wait=False)
    assert proc.popen.wait(20) == 2
    assert "cannot reach the backend" in proc.output()


async def test_wrong_protocol_version_gets_a_reason(pool: Pool) -> None:
    async with connect(_ws_url(pool), additional_headers={"Authorization": f"Bearer {pool.token}"}) as ws:
        await ws.send(_hello(version=protocol.PROTOCOL_VERSION + 41))
        reply = protocol.coordinator_decoder().decode(await ws.recv(decode=False))  # type: ignore[arg-type]
        assert isinstance(reply, Reject)
        assert f"protocol version {protocol.PROTOCOL_VERSION + 41} is not supported" in reply.reason
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert pool.agent_count() == 0


@pytest.mark.parametrize(
    ("frames", "code", "reason"),
    [
        ((b"\xc1\x00garbage",), 4400, "invalid frame"),
        ((msgspec.msgpack.encode({"type": "job.chunk", "job_id": 5}),), 4400, "invalid 'job.chunk' message"),
        (("a text frame",), 1003, "text frames"),
        ((b"\x00" * (9 * 1024 * 1024),), 1009, ""),
        ((_hello(),), 4400, "hello sent twice"),
    ],
)
async def test_bad_frames_close_only_that_connection(
    pool: Pool, served: None, frames: tuple[bytes | str, ...], code: int, reason: str
) -> None:
    closed_code, closed_reason = await _session(pool, *frames)
    assert closed_code == code
    assert reason in closed_reason
    _serving(pool)  # the coordinator and the other agent keep serving


async def test_unknown_tags_are_skipped(pool: Pool, served: None) -> None:
    future = msgspec.msgpack.encode({"type": "gpu.telemetry", "temp": 70})
    heartbeat = protocol.encode(protocol.Heartbeat(in_flight=0))
    code, reason = await _session(pool, future, heartbeat, future)
    assert (code, reason) == (None, "still open")
    _serving(pool)


def test_no_agent_and_no_upstream_gives_503(pool: Pool) -> None:
    response = pool.post(BODY)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "no_capacity"


def test_the_agent_logs_a_jobs_request_id(pool: Pool) -> None:
    """A backend that fails: the agent's warning about the job names the consumer's request, so
    one id follows a request from the coordinator's logs into the provider's."""
    agent = pool.agent(pool.standin(mode="fail"), ["smollm2-135m"])
    try:
        response = pool.post(BODY)
        assert response.status_code >= 500
        request_id = response.headers["x-request-id"]
        line = eventually(
            lambda: next((line for line in agent.output().splitlines() if '"job failed"' in line), None), timeout=5
        )
        assert msgspec.json.decode(line)["request_id"] == request_id
    finally:
        pool.stop_agents()


def test_killed_agent_before_first_chunk_fails_over(pool: Pool) -> None:
    backend = pool.standin(mode="hang")
    hanging = pool.agent(backend, ["smollm2-135m"], price_in="0.01", price_out="0.01", kinds="chat")  # no probe
    pool.agent(pool.standin(chunks=3), ["smollm2-135m"], price_in="1", price_out="1")  # dearer: second choice

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:
            request = asyncio.create_task(
                client.post(
                    f"{pool.url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {pool.key}"},
                    json={**BODY, "stream": True},
                )
            )
            await eventually_async(lambda: _received(client, backend))  # it waits on the hanging agent
            hanging.popen.kill()
            return await request

    response = asyncio.run(run())
    assert response.status_code == 200
    events = [msgspec.json.decode(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert "tok0 tok1 tok2" in text.replace("  ", " ")
    assert events[-1]["x_pool"]["attempts"] == 2  # the hanging agent first, then the other one


def test_agent_missing_heartbeats_is_dropped_and_its_job_fails_over(pool: Pool) -> None:
    frozen = pool.agent(pool.standin(mode="hang"), ["smollm2-135m"], price_in="0.01", price_out="0.01", kinds="chat")
    pool.agent(pool.standin(chunks=2), ["smollm2-135m"], price_in="1", price_out="1")
    frozen.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = pool.post(BODY)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1"
        assert response.json()["x_pool"]["attempts"] == 2  # it failed over from the frozen agent
        assert time.monotonic() - started < 10  # 3 missed 0.5 s heartbeats, not the 30 s first-chunk timeout
        pool.wait_agent_count(1)
    finally:
        frozen.signal(signal.SIGCONT)


def test_two_agents_share_concurrent_load(pool: Pool) -> None:
    pool.agent(pool.standin(chunks=2, interval_ms=200), ["smollm2-135m"], max_concurrency=4)
    pool.agent(pool.standin(chunks=2, interval_ms=200), ["smollm2-135m"], max_concurrency=4)

    async def burst() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{pool.url}/v1/chat/completions", headers={"authorization": f"Bearer {pool.key}"}, json=BODY
                    )
                    for _ in range(8)
                )
            )
        return [r.json()["x_pool"]["agent"] for r in responses]

    agents = asyncio.run(burst())
    assert len(set(agents)) == 2
    assert agents.count(agents[0]) == 4  # least-loaded placement splits 8 requests 4/4


def test_sigterm_drains_in_flight_jobs(pool: Pool) -> None:
    backend = pool.standin(chunks=5, interval_ms=300)  # a reply takes 1.5 s
    agent = pool.agent(backend, ["smollm2-135m"])

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:

            async def draining() -> bool:
                """The coordinator no longer counts the agent among those who can serve."""
                listing = (await client.get(f"{pool.url}/v1/models")).json()["data"]
                return {m["id"]: m for m in listing}.get("smollm2-135m", {}).get("providerCount") == 0

            request = asyncio.create_task(
                client.post(
                    f"{pool.url}/v1/chat/completions", headers={"authorization": f"Bearer {pool.key}"}, json=BODY
                )
            )
            await eventually_async(lambda: _received(client, backend))  # the job is running
            agent.signal(signal.SIGTERM)
            await eventually_async(draining)
            refused = await client.post(
                f"{pool.url}/v1/chat/completions", headers={"authorization": f"Bearer {pool.key}"}, json=BODY
            )
            assert refused.status_code == 503  # draining: no new jobs
            return await request

    response = asyncio.run(run())
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4"
    assert agent.popen.wait(10) == 0


def test_agent_reconnects_after_coordinator_restart(pool: Pool) -> None:
    agent = pool.agent(pool.standin(chunks=1), ["smollm2-135m"])
    assert pool.coordinator is not None
    pool.coordinator.stop()
    pool.coordinator = None
    pool.coordinator = localpool.start_coordinator(pool.port, pool.env, pool.dir, name="coordinator-restarted")
    localpool.wait_agents(pool.url, 1, agent, timeout=40)
    _serving(pool)
    assert agent.alive()


def test_agent_does_not_import_coordinator_dependencies() -> None:
    # importing the agent must not need the coordinator's dependencies (it runs on provider boxes)
    code = (
        "import sys, provider_agent.__main__; assert 'litestar' not in sys.modules and 'sqlalchemy' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_failed_agent_tokens_count_against_the_address(tmp_path: Path) -> None:
    pool = Pool(tmp_path, auth_failures_per_minute="5")
    pool.start()
    try:

        async def attempts() -> list[int]:
            codes = []
            for _ in range(7):
                try:
                    async with HostileAgent(pool.url, "pool_agent_" + "x" * 43):
                        codes.append(101)
                except Exception as exc:  # the upgrade is refused with an HTTP status
                    codes.append(getattr(getattr(exc, "response", None), "status_code", 0))
            return codes

        codes = asyncio.run(attempts())
        assert codes[:5] == [401] * 5
        assert codes[5:] == [429, 429]
    finally:
        pool.stop()
