"""Job kinds through real processes: agents ask their backends what they serve and announce it; a
completion or an embedding reaches only an agent that serves it, or the platform upstream; an agent
of the previous protocol keeps serving chat; bad inputs get the error envelope; usage is broken down
by kind. Stand-in backends play the providers' servers (one serving chat only, one serving all
three kinds); the same with llama.cpp is in tests/e2e/test_apis.py."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from scripts import localpool
from shared import protocol
from shared.protocol import JobAssign, JobDone, Limits, Reject, Usage, Welcome
from tests.harness import Pool, last_request
from tests.hostile import HostileAgent, offer, reply
from tests.standin import vector

EMBED = "smollm2-135m-embed"  # 576 numbers per vector, as the directory says
UPSTREAM_EMBED = "nomic-embed-text-v1.5"  # served by the platform upstream only (768, matryoshka)


@pytest.fixture(scope="module")
def kinds_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    workdir = tmp_path_factory.mktemp("kinds")
    port = localpool.free_port()
    upstream = localpool.start_standin(port, workdir, name="upstream", chunks=3, dims=768)
    pool = Pool(
        workdir,
        upstream_base_url=f"http://127.0.0.1:{port}/v1",
        upstream_models=f"{UPSTREAM_EMBED}=upstream-embed",
        upstream_kinds=f"{UPSTREAM_EMBED}=embedding",
    )
    pool.backends.append(upstream)
    pool.extra["upstream"] = f"http://127.0.0.1:{port}"
    pool.start()
    try:
        pool.extra["chat_only"] = chat_only = pool.standin(chunks=3, kinds="chat")
        pool.extra["full"] = full = pool.standin(chunks=3, dims=576)
        pool.agent(chat_only, ["smollm2-135m"], price_in="0.1", price_out="0.1")  # the cheaper for chat
        pool.agent(full, ["smollm2-135m", f"{EMBED}=standin"], price_in="0.2", price_out="0.4")
        yield pool
    finally:
        pool.stop()


def _counts(backend: str) -> dict[str, int]:
    return dict(httpx.get(f"{backend}/_counts", timeout=5).json())


def test_the_model_list_says_which_kinds_are_served(kinds_pool: Pool) -> None:
    listed = {m["id"]: m for m in httpx.get(f"{kinds_pool.url}/v1/models", timeout=10).json()["data"]}
    assert listed["smollm2-135m"]["kinds"] == ["chat", "completion"]  # the full stand-in's, asked at its start
    assert listed[EMBED]["kinds"] == ["embedding"] and listed[EMBED]["dimensions"] == 576
    assert listed[UPSTREAM_EMBED]["kinds"] == ["embedding"] and listed[UPSTREAM_EMBED]["fallbackAvailable"] is True


def test_completions_stream_and_not_through_the_sdk(kinds_pool: Pool) -> None:
    pool = kinds_pool
    client = pool.client()
    for _ in range(6):  # the chat-only agent is cheaper: never chosen for what it does not serve
        whole = client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=5)
        assert whole.choices[0].text == "tok0 tok1 tok2" and whole.model == "smollm2-135m"
        assert whole.usage is not None and whole.usage.completion_tokens == 3
        x_pool = (whole.model_extra or {})["x_pool"]
        assert x_pool["price_per_1m"] == {"input": 0.2, "output": 0.4}
        assert math.isclose(x_pool["cost_usd"], (5 * 0.2 + 3 * 0.4) / 1e6)
    sent = last_request(pool.extra["full"])
    assert sent["prompt"] == "Once upon a time" and sent["max_tokens"] == 5 and "echo" not in sent
    chunks = list(
        client.completions.create(
            model="smollm2-135m",
            prompt=[1, 2, 3],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 tok2 "
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert (chunks[-1].model_extra or {})["x_pool"]["model"] == "smollm2-135m"
    assert "/v1/completions" not in _counts(pool.extra["chat_only"])  # its probe was a 404, not a job
    assert _counts(pool.extra["full"])["/v1/completions"] >= 7


def _unpacked(reply_: Any) -> list[list[float]]:
    return [list(item.embedding) for item in reply_.data]


@pytest.mark.parametrize(
    "given",
    ["The food was delicious", ["first text", "second text", "third"], [101, 2023, 2003], [[1, 2], [3, 4, 5]]],
    ids=["string", "strings", "tokens", "token-lists"],
)
def test_embeddings_of_every_input_form(kinds_pool: Pool, given: Any) -> None:
    client = kinds_pool.client()
    items = [given] if isinstance(given, str) or isinstance(given[0], int) else given
    expected = [vector(item, 576) for item in items]
    as_base64 = client.embeddings.create(model=EMBED, input=given)  # the SDK asks for base64 and decodes it
    as_floats = client.embeddings.create(model=EMBED, input=given, encoding_format="float")
    assert _unpacked(as_floats) == expected  # exactly what the backend computed, in input order
    for got, want in zip(_unpacked(as_base64), expected, strict=True):
        assert len(got) == 576 and max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-6  # float32
    assert [item.index for item in as_floats.data] == list(range(len(items)))
    tokens = sum(len(item) if isinstance(item, list) else len(item.split()) for item in items)
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == tokens
    x_pool = (as_floats.model_extra or {})["x_pool"]
    assert x_pool["model"] == EMBED and math.isclose(x_pool["cost_usd"], tokens * 0.2 / 1e6)  # input price only
    assert "/v1/embeddings" not in _counts(kinds_pool.extra["chat_only"])


def test_embeddings_fall_back_to_the_upstream_and_honour_dimensions_where_the_model_allows(kinds_pool: Pool) -> None:
    client = kinds_pool.client()
    full = client.embeddings.create(model=UPSTREAM_EMBED, input=["a b", "c"], encoding_format="float")
    assert [len(item.embedding) for item in full.data] == [768, 768]
    assert (full.model_extra or {})["x_pool"]["fallback"] is True
    sent = last_request(kinds_pool.extra["upstream"])
    assert sent == {"model": "upstream-embed", "input": ["a b", "c"], "encoding_format": "float"}
    short = client.embeddings.create(model=UPSTREAM_EMBED, input=["a b", "c"], dimensions=64)
    for cut, whole in zip(_unpacked(short), _unpacked(full), strict=True):
        norm = math.sqrt(sum(x * x for x in whole[:64]))
        assert len(cut) == 64 and max(abs(a - b / norm) for a, b in zip(cut, whole, strict=False)) < 1e-6
        assert math.isclose(math.sqrt(sum(x * x for x in cut)), 1.0, rel_tol=1e-5)


def _refusal(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    assert raised.value.status_code == 400, raised.value.body
    body = raised.value.response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "invalid_request"
    return dict(body["error"])


def test_bad_inputs_get_the_error_envelope(kinds_pool: Pool) -> None:
    client = kinds_pool.client()
    error = _refusal(lambda: client.embeddings.create(model=EMBED, input="x", dimensions=8))
    assert error["param"] == "dimensions" and "does not support `dimensions`" in error["message"]
    error = _refusal(lambda: client.embeddings.create(model=UPSTREAM_EMBED, input="x", dimensions=769))
    assert error["param"] == "dimensions" and "at most 768" in error["message"]
    assert (
        "not an embedding model"
        in _refusal(lambda: client.embeddings.create(model="smollm2-135m", input="x"))["message"]
    )
    error = _refusal(lambda: client.completions.create(model=EMBED, prompt="x"))
    assert error["param"] == "model" and "POST /v1/embeddings" in error["message"]
    assert _refusal(lambda: client.embeddings.create(model=EMBED, input=["a", ""]))["param"] == "input[1]"
    assert _refusal(lambda: client.embeddings.create(model=EMBED, input=["a", [1]]))["param"] == "input"  # type: ignore[list-item]
    assert _refusal(lambda: client.embeddings.create(model="auto", input="x"))["param"] == "model"
    assert _refusal(lambda: client.completions.create(model="smollm2-135m", prompt="x", echo=True))["param"] == "echo"
    headers = {"authorization": f"Bearer {kinds_pool.key}"}
    for path, body in (
        ("/v1/embeddings", {"model": EMBED}),  # no input
        ("/v1/embeddings", {"model": EMBED, "input": []}),
        ("/v1/embeddings", {"model": EMBED, "input": "x", "encoding_format": "int8"}),
        ("/v1/completions", {"model": "smollm2-135m"}),  # no prompt
        ("/v1/completions", {"model": "smollm2-135m", "prompt": "x", "n": 2}),
    ):
        response = httpx.post(f"{kinds_pool.url}{path}", headers=headers, json=body, timeout=10)
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["error"]["code"] == "invalid_request"


def test_an_agent_of_the_previous_protocol_serves_chat_and_nothing_else(kinds_pool: Pool) -> None:
    async def answer(agent: HostileAgent, job: JobAssign) -> None:
        await agent.send(JobDone(job_id=job.job_id, usage=Usage(4, 2, 6), finish_reason="stop", tail=[reply("old")]))

    async def run() -> tuple[list[JobAssign], list[int]]:
        old = HostileAgent(kinds_pool.url, kinds_pool.token, models=[offer(kinds=[])], serve=answer)
        old.hello = msgspec.structs.replace(old.hello, protocol=1)  # what an agent before job kinds sent
        async with old:
            assert old.welcome is not None, old.rejected
            only = {"provider": {"only": [old.welcome.agent_id]}}
            headers = {"authorization": f"Bearer {kinds_pool.key}"}
            async with httpx.AsyncClient(base_url=kinds_pool.url, headers=headers, timeout=30) as http:
                chat = await http.post(
                    "/v1/chat/completions",
                    json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], **only},
                )
                assert chat.json()["choices"][0]["message"]["content"] == "old", chat.text
                completion = await http.post(
                    "/v1/completions", json={"model": "smollm2-135m", "prompt": "hi", "max_tokens": 3, **only}
                )
            return old.assigned, [chat.status_code, completion.status_code]

    assigned, statuses = asyncio.run(run())
    assert statuses == [200, 503]  # nobody the request allows serves completions
    assert [job.kind for job in assigned] == ["chat"]


def test_usage_and_the_request_log_break_spend_down_by_kind(kinds_pool: Pool) -> None:
    client = kinds_pool.client()
    embedded = client.embeddings.create(model=EMBED, input="one two three")
    completed = client.completions.create(model="smollm2-135m", prompt="x", max_tokens=3)
    headers = {"authorization": f"Bearer {kinds_pool.key}"}
    usage = httpx.get(f"{kinds_pool.url}/v1/usage", headers=headers, timeout=10).json()
    totals = {row["kind"]: row for row in usage["byKind"]}
    assert {"completion", "embedding"} <= set(totals)
    assert totals["embedding"]["completionTokens"] == 0 and totals["embedding"]["costNano"] > 0
    spent = {(row["model"], row["kind"]) for row in usage["data"] if row["costNano"] > 0}
    assert (EMBED, "embedding") in spent and (EMBED, "completion") not in spent  # that one was refused: free
    for generation_id, kind in (
        ((embedded.model_extra or {})["x_pool"]["request_id"], "embedding"),
        (completed.id, "completion"),
    ):
        logged = kinds_pool.generation(generation_id)
        assert logged is not None and logged["kind"] == kind and logged["costNano"] > 0


async def test_an_agent_speaks_an_older_coordinators_protocol(tmp_path: Path) -> None:
    """A pool mid-upgrade: a coordinator of protocol 1 (played here by a websocket server that says
    what one said) refuses version 2; the agent reconnects at once with version 1's hello, the
    models it serves for chat only, announced without kinds. With no such model it stops."""
    hellos: list[dict[str, Any]] = []
    welcomed = asyncio.Event()

    async def older(ws: ServerConnection) -> None:
        try:
            hello = msgspec.msgpack.decode(await ws.recv(decode=False))
        except ConnectionClosed:  # the agent found nothing to offer this version
            return
        hellos.append(hello)
        if hello["protocol"] != 1:
            refusal = "protocol version 2 is not supported; this coordinator speaks version 1: upgrade pool-agent"
            await ws.send(protocol.encode(Reject(reason=refusal)))
            await ws.close(protocol.CLOSE_PROTOCOL_ERROR)
            return
        await ws.send(
            protocol.encode(Welcome(agent_id="agt_old", heartbeat_interval=30.0, limits=Limits(1 << 20, 100)))
        )
        welcomed.set()
        await ws.wait_closed()

    port, backends = localpool.free_port(), []
    async with serve(older, "127.0.0.1", port):
        url = f"http://127.0.0.1:{port}"
        for kinds in ("chat,completion,embedding", "embedding"):
            backend_port = localpool.free_port()
            backends.append(localpool.start_standin(backend_port, tmp_path, name=f"backend-{kinds}", kinds=kinds))
            agent = localpool.start_agent(
                url,
                "pool_agent_x",
                f"http://127.0.0.1:{backend_port}",
                ["smollm2-135m", "gemma-3-270m"],
                tmp_path,
                name=f"agent-{kinds}",
            )
            try:
                if kinds == "embedding":  # nothing to offer an older coordinator: it stops, saying why
                    assert await asyncio.to_thread(agent.popen.wait, 30) == 1
                    assert "serves chat only, and no model here serves chat" in agent.output()
                    continue
                await asyncio.wait_for(welcomed.wait(), 30)
            finally:
                await asyncio.to_thread(agent.stop)
        for backend in backends:
            backend.stop()
    first, second = hellos[0], hellos[1]
    assert first["protocol"] == protocol.PROTOCOL_VERSION and first["models"][0]["kinds"] == [
        "chat",
        "completion",
        "embedding",
    ]
    assert second["protocol"] == 1 and [m.get("kinds") for m in second["models"]] == [None, None]  # as version 1 sent
    assert [m["backend_model"] for m in second["models"]] == ["smollm2-135m", "gemma-3-270m"]
