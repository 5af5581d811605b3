"""The chat endpoint's request and response shapes through real coordinator and agent processes,
against llama.cpp's server running SmolLM2-135M-Instruct, driven by the official `openai` SDK. The
shapes that need what only the stand-in backend can do (show the body it received) and the refusals
that reach no backend are in tests/integration/test_chat_api.py."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest

from tests.harness import Pool
from tests.waiting import eventually

MSG = [{"role": "user", "content": "Hi"}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def served(pool: Pool, llama: str) -> str:
    """One agent serving `smollm2-135m` from llama.cpp; returns llama.cpp's URL."""
    pool.agent(llama, ["smollm2-135m"])
    return llama


def test_openai_sdk_non_stream_and_stream(pool: Pool, served: str) -> None:
    client = pool.client()
    reply = client.chat.completions.create(model="smollm2-135m", messages=MSG, temperature=0)  # type: ignore[arg-type]
    content = reply.choices[0].message.content
    assert content and reply.choices[0].finish_reason == "stop"  # SmolLM2 answers "Hi" in a few words
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    x_pool = (reply.model_extra or {})["x_pool"]
    assert x_pool["fallback"] is False and x_pool["agent"].startswith("agt_") and x_pool["latency_ms"] >= 0

    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m",
            messages=MSG,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == content  # greedy decoding: the same answer, whole or streamed
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == usage.total_tokens  # counted the same way as the whole reply
    assert (chunks[-1].model_extra or {})["x_pool"]["fallback"] is False
    # without include_usage every chunk has a choice (naive `choices[0]` loops keep working)
    plain = list(client.chat.completions.create(model="smollm2-135m", messages=MSG, temperature=0, stream=True))  # type: ignore[arg-type]
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)
    assert "x_pool" in (plain[-1].model_extra or {}) and plain[-1].choices[0].finish_reason == "stop"


def test_real_model_non_stream_and_stream(pool: Pool, llama: str) -> None:
    pool.agent(llama, ["smollm2-135m"])
    client = pool.client()
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=QUESTION,
        temperature=0,
        max_tokens=20,  # type: ignore[arg-type]
    )
    assert (reply.choices[0].message.content or "").strip()
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    # The consumer sees the slug it asked for and the pool's generation id, which the generation
    # endpoint takes; llama.cpp's own fields (timings, system_fingerprint) don't reach it.
    assert reply.model == "smollm2-135m"
    x_pool = (reply.model_extra or {})["x_pool"]
    assert reply.id == x_pool["request_id"]
    assert not {"timings", "system_fingerprint"} & (reply.model_extra or {}).keys()
    assert reply.system_fingerprint is None
    generation = eventually(lambda: pool.generation(reply.id))
    assert generation["model"] == "smollm2-135m" and generation["completionTokens"] == reply.usage.completion_tokens

    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and len([c for c in chunks if c.choices]) > 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    x_pool = (chunks[-1].model_extra or {})["x_pool"]
    assert x_pool["fallback"] is False and x_pool["ttft_ms"] <= x_pool["latency_ms"]
    assert {c.id for c in chunks} == {x_pool["request_id"]}  # one id in every chunk, as OpenRouter does
    assert {c.model for c in chunks} == {"smollm2-135m"}
    assert all(not {"timings", "system_fingerprint"} & (c.model_extra or {}).keys() for c in chunks)
    # What llama.cpp called itself stays in the request log, for the audit.
    query = "SELECT backend_model, backend_id FROM request_log WHERE id = ?"
    rows = eventually(lambda: pool.query(query, x_pool["request_id"]))
    assert rows and rows[0][0] and rows[0][1] and rows[0][1] != x_pool["request_id"]


def test_tools_and_response_format_reach_the_backend(pool: Pool, llama: str) -> None:
    pool.agent(llama, ["smollm2-135m"])
    client = pool.client()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    # SmolLM2's chat template has no tool syntax, so llama.cpp accepts and ignores `tools`; what
    # shows they arrive intact is that llama.cpp parses them (a malformed schema would be a 400).
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=QUESTION,
        tools=tools,
        tool_choice="auto",
        max_tokens=10,  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # response_format is enforced by llama.cpp's grammar: the reply can only be this JSON
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "enum": ["Paris"]}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    constrained = client.chat.completions.create(
        model="smollm2-135m",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=30,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},  # type: ignore[typeddict-item]
    )
    assert json.loads(constrained.choices[0].message.content or "") == {"capital": "Paris"}


def test_oversized_body_gets_413_and_keeps_serving(pool: Pool, served: str) -> None:
    huge = json.dumps({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x" * 5_000_000}]})
    response = pool.post(content=huge.encode())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert pool.post({"model": "smollm2-135m", "messages": MSG, "max_tokens": 5}).status_code == 200


def test_models_directory_and_schema(pool: Pool, served: str) -> None:
    listing = httpx.get(f"{pool.url}/v1/models").json()
    assert listing["object"] == "list"
    entry = next(m for m in listing["data"] if m["id"] == "smollm2-135m")
    assert {"id", "object", "created", "owned_by"} <= entry.keys()
    assert entry["providerCount"] == 1 and entry["minPricePer1mTokensUsd"] == pytest.approx(0.3)
    assert entry["slug"] == "smollm2-135m" and entry["displayName"] and 0 < entry["avgTrustScore"] <= 100
    assert [m.id for m in pool.client().models.list()] == [m["id"] for m in listing["data"]]
    schema = httpx.get(f"{pool.url}/schema/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/pool/status"} <= schema["paths"].keys()
    assert "ChatCompletionRequest" in msgspec.json.encode(schema).decode()
