"""End to end with the real model: llama.cpp's server running SmolLM2-135M-Instruct, the coordinator
and agents as separate processes, driven by the official `openai` package: load shared between
agents, a failover from a killed agent, a consumer's disconnect reaching the backend, and the demo.
The chat endpoint's request and response shapes are in tests/e2e/test_chat_api.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from scripts import localpool
from scripts.localpool import ROOT
from tests.harness import Pool, last_request
from tests.waiting import eventually

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_two_agents_share_concurrent_real_load(pool: Pool, llama: str) -> None:
    pool.agent(llama, ["smollm2-135m"], max_concurrency=2)
    pool.agent(llama, ["smollm2-135m"], max_concurrency=2)

    async def burst() -> list[dict[str, object]]:
        async with httpx.AsyncClient(timeout=120) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{pool.url}/v1/chat/completions",
                        headers={"authorization": f"Bearer {pool.key}"},
                        json={"model": "smollm2-135m", "messages": QUESTION, "max_tokens": 8},
                    )
                    for _ in range(4)
                )
            )
        return [r.json() for r in responses]

    replies = asyncio.run(burst())
    assert all(r["choices"][0]["message"]["content"] for r in replies)  # type: ignore[index]
    assert len({r["x_pool"]["agent"] for r in replies}) == 2  # type: ignore[index]


def test_a_provider_is_chosen_by_its_slug_and_the_reply_says_at_what_price(pool: Pool, llama: str) -> None:
    pool.agent(llama, ["smollm2-135m"], price_in="0.25", price_out="0.5")
    providers = httpx.get(f"{pool.url}/v1/providers", timeout=10).json()["data"]
    (serving,) = [p for p in providers if p["models"] == ["smollm2-135m"] and p["status"] == "live"]
    (offer,) = httpx.get(f"{pool.url}/v1/prices", params={"provider": serving["slug"]}, timeout=10).json()["data"]
    assert (offer["input_per_1m"], offer["output_per_1m"], offer["blended_per_1m"]) == (0.25, 0.5, 0.3125)
    reply = pool.client().chat.completions.create(
        model="smollm2-135m",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=8,
        extra_body={"provider": {"only": [serving["slug"]], "sort": "latency"}},
    )
    assert reply.choices[0].message.content
    x_pool = (reply.model_extra or {})["x_pool"]
    assert (x_pool["provider_slug"], x_pool["provider_name"]) == (serving["slug"], serving["name"])
    assert x_pool["price_per_1m"] == {"input": 0.25, "output": 0.5} and x_pool["routed_by"] == "latency"
    assert reply.usage is not None
    expected = (reply.usage.prompt_tokens * 0.25 + reply.usage.completion_tokens * 0.5) / 1_000_000
    assert abs(x_pool["cost_usd"] - expected) < 1e-9  # charged at the prices it says


def test_killed_agent_before_first_chunk_still_replies(pool: Pool, llama: str) -> None:
    hanging = pool.standin(mode="hang")
    # cheaper: the first choice; a hanging backend can't be asked what it serves, so its kinds are given
    stuck = pool.agent(hanging, ["smollm2-135m"], price_in="0.01", price_out="0.01", kinds="chat")
    pool.agent(llama, ["smollm2-135m"], price_in="1", price_out="1")
    client = pool.client()
    with ThreadPoolExecutor(1) as thread:
        request = thread.submit(
            client.chat.completions.create,
            model="smollm2-135m",
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=20,
            temperature=0,
        )
        eventually(lambda: last_request(hanging))  # the request waits on the hanging agent
        stuck.popen.kill()
        reply = request.result(timeout=60)
    assert (reply.choices[0].message.content or "").strip()
    assert (reply.model_extra or {})["x_pool"]["attempts"] == 2  # the hanging agent first, then llama.cpp


def _slots_busy(llama: str) -> int:
    return sum(1 for slot in httpx.get(f"{llama}/slots", timeout=5).json() if slot["is_processing"])


def test_consumer_disconnect_cancels_the_backend_request(pool: Pool, llama: str) -> None:
    pool.agent(llama, ["smollm2-135m"])
    with httpx.stream(
        "POST",
        f"{pool.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {pool.key}"},
        json={
            "model": "smollm2-135m",
            "messages": QUESTION,
            "stream": True,
            "max_tokens": 3000,
            "logit_bias": {"0": -100, "1": -100, "2": -100},  # its end tokens banned: it never stops early
        },
        timeout=60,
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for line in (next(lines) for _ in range(12)) if line.startswith("data:")]
        assert len(received) >= 5
        assert _slots_busy(llama) == 1  # 3000 forced tokens take far longer than this test waits
    eventually(lambda: _slots_busy(llama) == 0, timeout=5, interval=0.1)


def test_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "DEMO_PORT": str(localpool.free_port())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.demo"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = b""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while b"Directory:" not in output and time.monotonic() < deadline and proc.poll() is None:
            output += proc.stdout.readline()
        text = output.decode()
        assert "Ready." in text, text
        assert "first answer through the pool" in text and "curl -s" in text and "OpenAI(" in text
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 3  # llama.cpp, coordinator, agent
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    still_running = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert still_running == []
