"""The agent's job runner against llama.cpp: a non-streamed reply goes in one frame only to
coordinators that take it, and streams are never held back."""

from __future__ import annotations

import json
import time

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
