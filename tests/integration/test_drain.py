"""SIGTERM on a coordinator with an open stream, beside a second coordinator on the same PostgreSQL
database: readiness fails at once, the stream runs to its end, new requests get a clear 503 once
the notice is over, and the agent, closed with ``CLOSE_DRAINING``, reconnects to the other
coordinator at once (``--coordinator A,B``) and serves there; the books balance."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from scripts import localpool
from scripts.localpool import Proc
from tests.harness import Pool, agents_at
from tests.ledger_checks import ledger_problems
from tests.waiting import eventually

MSG = [{"role": "user", "content": "count to thirty"}]
CHUNKS, INTERVAL_MS = 30, 100  # a stream of about 3 s


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory, own_database: str) -> Iterator[tuple[Pool, Proc, str]]:
    """Coordinator A (the harness's) and B, on one database; B's URL."""
    workdir = tmp_path_factory.mktemp("drain")
    a = Pool(workdir, db_url=own_database, drain_notice_seconds="0.5", drain_timeout="20")
    a.start()
    port = localpool.free_port()
    b = localpool.start_coordinator(port, a.env, workdir, name="coordinator-b")
    try:
        yield a, b, f"http://127.0.0.1:{port}"
    finally:
        a.stop()
        b.stop()


def test_sigterm_drains_the_streams_and_sends_the_agent_to_the_other_coordinator(
    pools: tuple[Pool, Proc, str], own_database: str
) -> None:
    a, _, b_url = pools
    agent = a.agent(a.standin(chunks=CHUNKS, interval_ms=INTERVAL_MS), ["smollm2-135m"], coordinator=f"{a.url},{b_url}")
    assert (agents_at(a.url), agents_at(b_url)) == (1, 0)

    stream: dict[str, object] = {}

    def consume() -> None:
        body = {"model": "smollm2-135m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
        headers = {"authorization": f"Bearer {a.key}"}
        with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
            stream["status"] = response.status_code
            stream["lines"] = [line for line in response.iter_lines() if line.startswith("data: ")]

    consumer = threading.Thread(target=consume)
    consumer.start()
    eventually(lambda: "lines" in stream or _busy(a), timeout=10, explain=lambda: "the stream never started")
    assert a.coordinator is not None
    a.coordinator.signal(signal.SIGTERM)
    not_ready = eventually(
        lambda: (r := httpx.get(f"{a.url}/readyz", timeout=5)).status_code == 503 and r, timeout=2, interval=0.05
    )
    assert not_ready.json()["checks"]["draining"] == "yes"
    time.sleep(0.7)  # past the notice: new requests are refused, the open stream goes on
    refused = a.post({"model": "smollm2-135m", "messages": MSG})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down" and refused.headers["retry-after"] == "1"
    assert "lines" not in stream  # still streaming

    consumer.join(30)
    assert stream["status"] == 200
    lines = stream["lines"]
    assert isinstance(lines, list) and lines[-1] == "data: [DONE]"
    assert sum(1 for line in lines if '"content"' in line) >= CHUNKS  # every chunk arrived
    assert not any('"error"' in line for line in lines)

    closed_at = time.monotonic()
    eventually(lambda: agents_at(b_url) == 1, timeout=5, interval=0.05, explain=lambda: agent.output()[-2000:])
    moved_in = time.monotonic() - closed_at
    assert "reconnecting at once" in agent.output()
    a.coordinator.popen.wait(20)  # A exits once drained
    assert not a.coordinator.alive()
    print(f"\nagent serving from B {moved_in:.2f} s after the stream on A ended")

    served = httpx.post(
        f"{b_url}/v1/chat/completions",
        json={"model": "smollm2-135m", "messages": MSG},
        headers={"authorization": f"Bearer {a.key}"},
        timeout=30,
    )
    assert served.status_code == 200, served.text
    assert served.json()["x_pool"]["fallback"] is False  # the agent served it, from B
    assert asyncio.run(_problems(own_database)) == []


def _busy(pool: Pool) -> bool:
    metrics = httpx.get(f"{pool.url}/metrics", timeout=5).text
    return "pool_jobs_in_flight 1.0" in metrics


async def _problems(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        return await ledger_problems(engine)
    finally:
        await engine.dispose()
