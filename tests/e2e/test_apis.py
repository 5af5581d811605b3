"""The API shapes beyond chat, end to end: OpenAI's completions, embeddings and Responses API and
Anthropic's Messages API through the official `openai` and `anthropic` packages, against the
coordinator and agents as processes and llama.cpp (SmolLM2 for chat and completions, SmolLM2 with
mean pooling for embeddings). A stand-in agent gives the exact tool calls the tool round trips
need (a 135M model calls tools at random). Job kinds with stand-ins only: tests/integration/test_kinds.py."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.harness import Pool, last_request
from tests.standin import TOOL_ARGUMENTS, TOOL_CALL_ID

EMBED = "smollm2-135m-embed"
TOOLS_MODEL = "gemma-3-270m-it"  # served by the stand-in agent, which calls tools exactly
QUESTION = "What is the capital of France?"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}


@pytest.fixture(scope="module")
def apis(tmp_path_factory: pytest.TempPathFactory, llama: str, llama_embed: str) -> Iterator[Pool]:
    pool = Pool(tmp_path_factory.mktemp("apis"))
    pool.start()
    try:
        pool.extra["tools"] = tools = pool.standin(chunks=3)
        pool.agent(llama, ["smollm2-135m"])  # asks llama.cpp: chat and completions
        pool.agent(llama_embed, [f"{EMBED}=local-model"])  # … embeddings only
        pool.agent(tools, [f"{TOOLS_MODEL}=standin"])
        yield pool
    finally:
        pool.stop()


def _x_pool(reply: Any) -> dict[str, Any]:
    return dict((reply.model_extra or {})["x_pool"])


# --- completions and embeddings ------------------------------------------------------------------


def test_completions_stream_and_not(apis: Pool) -> None:
    client = apis.client()
    whole = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8)
    assert whole.choices[0].text.strip() and whole.model == "smollm2-135m"
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 8
    assert _x_pool(whole)["cost_usd"] > 0
    chunks = list(
        client.completions.create(
            model="smollm2-135m",
            prompt="Once upon a time",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
    last = chunks[-1]
    assert last.usage is not None and 0 < last.usage.completion_tokens <= 8
    assert _x_pool(last)["model"] == "smollm2-135m"


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_of_every_input_form_are_the_models(apis: Pool, llama_embed: str) -> None:
    client = apis.client()
    for given in ("The food was delicious", ["first text", "second text"], [1, 2, 3, 4], [[1, 2, 3], [4, 5]]):
        direct = httpx.post(f"{llama_embed}/v1/embeddings", json={"input": given}, timeout=60).json()
        expected = [item["embedding"] for item in sorted(direct["data"], key=lambda item: item["index"])]
        as_floats = client.embeddings.create(model=EMBED, input=given, encoding_format="float")
        as_base64 = client.embeddings.create(model=EMBED, input=given)  # the SDK's default: base64, decoded
        assert [item.embedding for item in as_floats.data] == expected, given
        for item, want in zip(as_base64.data, expected, strict=True):
            assert len(item.embedding) == 576 and _cosine(list(item.embedding), want) > 0.99999
        assert as_floats.usage.prompt_tokens == direct["usage"]["prompt_tokens"] > 0
        assert _x_pool(as_floats)["cost_usd"] > 0
    similar = client.embeddings.create(model=EMBED, input=["a cat", "a kitten", "stock market crash"])
    cat, kitten, market = (list(item.embedding) for item in similar.data)
    assert _cosine(cat, kitten) > _cosine(cat, market)  # a real model's sense of meaning
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=EMBED, input="x", dimensions=64)
    assert refused.value.code == "invalid_request" and (refused.value.body or {}).get("param") == "dimensions"


# --- the Responses API ---------------------------------------------------------------------------


def test_responses_text_with_instructions(apis: Pool) -> None:
    reply = apis.client().responses.create(
        model="smollm2-135m", instructions="Answer in one word.", input=QUESTION, max_output_tokens=16
    )
    assert reply.output_text.strip() and reply.status in ("completed", "incomplete")
    assert reply.usage is not None and 0 < reply.usage.output_tokens <= 16 and reply.usage.input_tokens > 0
    assert _x_pool(reply)["model"] == "smollm2-135m"


def test_responses_keep_to_a_json_schema(apis: Pool) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    reply = apis.client().responses.create(
        model="smollm2-135m",
        input=QUESTION,
        max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert set(json.loads(reply.output_text)) == {"city"}


def test_responses_stream_their_events_in_order(apis: Pool) -> None:
    events = list(
        apis.client().responses.create(model="smollm2-135m", input=QUESTION, max_output_tokens=12, stream=True)
    )
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas
    assert [kind for kind in kinds if kind != "response.output_text.delta"] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        kinds[-1],
    ]
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.output_text == "".join(deltas)
    assert final.response.usage is not None and final.response.usage.output_tokens > 0


def test_a_function_tool_round_trip_through_the_responses_api(apis: Pool) -> None:
    client = apis.client()
    tools: Any = [{"type": "function", "name": "get_weather", "description": "The weather now", "parameters": WEATHER}]
    first = client.responses.create(model=TOOLS_MODEL, input="Weather in Paris?", tools=tools)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (call.name, call.call_id, json.loads(call.arguments)) == (
        "get_weather",
        TOOL_CALL_ID,
        json.loads(TOOL_ARGUMENTS),
    )
    history: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 18}'},
    ]
    second = client.responses.create(model=TOOLS_MODEL, input=history, tools=tools)
    assert second.output_text == "tok0 tok1 tok2"
    seen = last_request(apis.extra["tools"])["messages"]
    assert seen[1]["tool_calls"][0]["id"] == TOOL_CALL_ID and seen[2] == {
        "role": "tool",
        "tool_call_id": TOOL_CALL_ID,
        "content": '{"celsius": 18}',
    }
    streamed = list(client.responses.create(model=TOOLS_MODEL, input="Weather in Paris?", tools=tools, stream=True))
    pieces = [event.delta for event in streamed if event.type == "response.function_call_arguments.delta"]
    assert len(pieces) == 2 and "".join(pieces) == TOOL_ARGUMENTS
    done = [event for event in streamed if event.type == "response.function_call_arguments.done"]
    assert done[0].arguments == TOOL_ARGUMENTS and streamed[-1].type == "response.completed"


def test_responses_refuse_what_needs_stored_state_in_the_openai_envelope(apis: Pool) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        apis.client().responses.create(model="smollm2-135m", input="hi", previous_response_id="resp_123")
    assert refused.value.code == "invalid_request" and (refused.value.body or {}).get("param") == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as refused:
        apis.client().responses.create(model="smollm2-135m", input="hi", tools=[{"type": "web_search"}])  # type: ignore[list-item]
    assert (refused.value.body or {}).get("param") == "tools[0].type"


# --- Anthropic's Messages API --------------------------------------------------------------------


def _anthropic(pool: Pool, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=pool.url, api_key=key or pool.key, max_retries=0)


def test_messages_create_and_stream_text(apis: Pool) -> None:
    client = _anthropic(apis)
    message = client.messages.create(
        model="smollm2-135m",
        max_tokens=16,
        system="Answer briefly.",
        messages=[{"role": "user", "content": QUESTION}],
    )
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and 0 < message.usage.output_tokens <= 16
    with client.messages.stream(
        model="smollm2-135m", max_tokens=16, messages=[{"role": "user", "content": QUESTION}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_a_tool_round_trip_through_the_messages_api(apis: Pool) -> None:
    client = _anthropic(apis)
    tools: Any = [{"name": "get_weather", "description": "The weather now", "input_schema": WEATHER}]
    asked: Any = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model=TOOLS_MODEL, max_tokens=64, tools=tools, messages=asked)
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert first.stop_reason == "tool_use" and (use.id, use.name) == (TOOL_CALL_ID, "get_weather")
    assert use.input == json.loads(TOOL_ARGUMENTS)
    answered: Any = [
        *asked,
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}]},
    ]
    second = client.messages.create(model=TOOLS_MODEL, max_tokens=64, tools=tools, messages=answered)
    assert second.content[0].type == "text" and second.content[0].text == "tok0 tok1 tok2"
    assert last_request(apis.extra["tools"])["messages"][2] == {
        "role": "tool",
        "tool_call_id": use.id,
        "content": "18 C",
    }
    with client.messages.stream(model=TOOLS_MODEL, max_tokens=64, tools=tools, messages=asked) as stream:
        final = stream.get_final_message()
    (streamed,) = [block for block in final.content if block.type == "tool_use"]
    assert streamed.input == json.loads(TOOL_ARGUMENTS) and final.stop_reason == "tool_use"


def test_messages_errors_are_in_anthropics_shape(apis: Pool) -> None:
    with pytest.raises(anthropic.AuthenticationError) as refused:
        _anthropic(apis, key="pool_live_wrong").messages.create(
            model="smollm2-135m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": refused.value.body["error"]["message"]},
    }  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as refused:
        _anthropic(apis).messages.create(
            model="smollm2-135m",
            max_tokens=8,
            messages=[
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]}
            ],  # type: ignore[list-item]
        )
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    headers = {"x-api-key": apis.key, "anthropic-version": "2023-06-01"}
    for body in ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}, {"model": "smollm2-135m"}):
        response = httpx.post(f"{apis.url}/v1/messages", headers=headers, json=body, timeout=10)  # no max_tokens
        assert response.status_code == 400 and response.json()["type"] == "error", response.text
        assert response.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in response.text
    with pytest.raises(anthropic.NotFoundError) as missing:
        _anthropic(apis).messages.create(
            model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
