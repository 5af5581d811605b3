"""Anthropic's Messages API on the chat path: requests, replies, streamed events and errors, checked
against the chat path's own validation and, where it is installed, Anthropic's SDK."""

from __future__ import annotations

from typing import Any

import anthropic
import msgspec
import pytest
from anthropic import _base_client as base_client  # which HTTP library the SDK runs on
from anthropic.lib.streaming import _messages as streaming  # the SDK's own stream accumulator
from anthropic.types import Message

from coordinator.market.messages_api import (
    MessagesRequest,
    MessageStream,
    ShapeError,
    error_body,
    from_chat,
    to_chat,
)
from shared.openai import ChatCompletionRequest

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}


def request(**fields: Any) -> MessagesRequest:
    body = {"model": "llama-3-8b", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]} | fields
    return msgspec.json.decode(msgspec.json.encode(body), type=MessagesRequest)


def chat(**fields: Any) -> dict[str, Any]:
    """``to_chat``'s body, after checking that the chat path takes it."""
    body = to_chat(request(**fields))
    msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest)
    return body


def refused(**fields: Any) -> ShapeError:
    with pytest.raises(ShapeError) as caught:
        to_chat(request(**fields))
    return caught.value


# --- requests ------------------------------------------------------------------------------------


def test_string_content() -> None:
    body = chat()
    assert body == {
        "model": "llama-3-8b",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "stream": False,
    }


def test_text_blocks() -> None:
    one = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}])
    assert one["messages"] == [{"role": "user", "content": "hi"}]
    two = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert two["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("Be brief.", "Be brief."),
        ([{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}], "Be brief.\nBe kind."),
    ],
)
def test_system(system: Any, expected: str) -> None:
    assert chat(system=system)["messages"][0] == {"role": "system", "content": expected}


def test_empty_system_is_left_out() -> None:
    assert chat(system="")["messages"] == [{"role": "user", "content": "hi"}]


def test_base64_image() -> None:
    content = [{"type": "text", "text": "what is this?"}, {"type": "image", "source": PNG}]
    body = chat(messages=[{"role": "user", "content": content}])
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]


@pytest.mark.parametrize(
    "source",
    [
        {"type": "url", "url": "https://example.com/cat.png"},
        {"type": "file", "file_id": "file_1"},
        {"type": "base64", "media_type": "application/pdf", "data": "JVBER"},
    ],
)
def test_image_other_than_inline_is_refused(source: dict[str, Any]) -> None:
    error = refused(
        messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image", "source": source}]}]
    )
    assert error.param == "messages[0].content[1].source"


def test_tool_history_in_chat_order() -> None:
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "two tools", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here you go."},
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "no clock"}],
                    "is_error": True,
                },
            ],
        },
    ]
    body = chat(messages=messages, tools=[WEATHER, TIME])
    assert body["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no clock"},
        {"role": "user", "content": "Here you go."},
    ]


def test_tool_results_alone_make_no_user_message() -> None:
    messages = [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "noon"}]},
    ]
    body = chat(messages=messages, tools=[TIME])
    assert body["messages"][1]["content"] is None
    assert body["messages"][2:] == [{"role": "tool", "tool_call_id": "t1", "content": "noon"}]


def test_tools() -> None:
    body = chat(tools=[WEATHER, TIME | {"type": "custom"}])
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "description": "Weather in a city",
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": TIME["input_schema"]}},
    ]
    assert "tool_choice" not in body


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_time"}, {"type": "function", "function": {"name": "get_time"}}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    body = chat(tools=[WEATHER, TIME], tool_choice=choice)
    assert body["tool_choice"] == expected
    assert "parallel_tool_calls" not in body


def test_disable_parallel_tool_use() -> None:
    body = chat(tools=[WEATHER], tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert body["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}, "tools[0].type"),
        ({"tools": [WEATHER, {"name": "no_schema"}]}, "tools[1]"),
        ({"tools": [WEATHER | {"name": "has space"}]}, "tools[0].name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "audio"}]}]},
            "messages[1].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "image", "source": PNG}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages[0].content[0]"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": PNG}]}
                        ],
                    }
                ]
            },
            "messages[0].content[0].content[0].type",
        ),
    ],
)
def test_refused(fields: dict[str, Any], param: str) -> None:
    error = refused(**fields)
    assert error.param == param
    assert error.message


def test_four_stop_sequences_pass() -> None:
    assert chat(stop_sequences=["a", "b", "c", "d"])["stop"] == ["a", "b", "c", "d"]


def test_sampling_metadata_provider_and_stream() -> None:
    body = chat(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        metadata={"user_id": "u-42"},
        provider={"sort": "price", "only": ["acme"]},
        stream=True,
        thinking={"type": "enabled", "budget_tokens": 1024},
        service_tier="auto",
    )
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["top_k"] == 40
    assert body["user"] == "u-42"
    assert body["provider"] == {"sort": "price", "only": ["acme"], "allow_fallbacks": True}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "thinking" not in body and "service_tier" not in body and "metadata" not in body


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": None},
        {"max_tokens": 0},
        {"temperature": 1.5},
        {"messages": []},
        {"messages": [{"role": "system", "content": "x"}]},
        {"provider": {"nope": 1}},
    ],
)
def test_bad_fields_fail_decoding(fields: dict[str, Any]) -> None:
    body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]} | fields
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(body), type=MessagesRequest)


# --- replies -------------------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str | None = "stop", **choice: Any) -> dict[str, Any]:
    return {
        "id": "gen-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant"} | message, "finish_reason": finish} | choice],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
        "x_pool": {"provider": "prv_1", "cost_usd": 0.0001},
    }


def sdk_message(message: dict[str, Any]) -> None:
    """Anthropic's SDK (a dev dependency) takes it as a Message."""
    assert Message.model_validate(message).id == message["id"]


def test_from_chat_text() -> None:
    message = from_chat(completion({"content": "Hello!"}), message_id="msg_1", model="llama-3-8b")
    assert message == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "llama-3-8b",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 5},
        "x_pool": {"provider": "prv_1", "cost_usd": 0.0001},
    }
    sdk_message(message)


def test_from_chat_tool_calls() -> None:
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "not json"}},
        {"type": "function", "function": {"name": "get_time", "arguments": ""}},
    ]
    message = from_chat(
        completion({"content": "Let me look.", "tool_calls": calls}, "tool_calls"), message_id="msg_2", model="m"
    )
    assert message["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}},
        {"type": "tool_use", "id": "toolu_msg_2_2", "name": "get_time", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use"
    sdk_message(message)


@pytest.mark.parametrize(
    ("finish", "extra", "reason", "sequence"),
    [
        ("stop", {}, "end_turn", None),
        ("length", {}, "max_tokens", None),
        ("tool_calls", {}, "tool_use", None),
        ("content_filter", {}, "refusal", None),
        ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),
        ("stop", {"stop_reason": 128001}, "end_turn", None),
        (None, {}, "end_turn", None),
    ],
)
def test_stop_reasons(finish: str | None, extra: dict[str, Any], reason: str, sequence: str | None) -> None:
    message = from_chat(completion({"content": "x"}, finish, **extra), message_id="msg_3", model="m")
    assert (message["stop_reason"], message["stop_sequence"]) == (reason, sequence)
    sdk_message(message)


def test_from_chat_without_usage_or_x_pool() -> None:
    message = from_chat(
        {"choices": [{"message": {"content": None}, "finish_reason": "stop"}]}, message_id="m4", model="m"
    )
    assert message["content"] == [] and message["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert "x_pool" not in message


# --- streams -------------------------------------------------------------------------------------


def parse(frames: list[bytes]) -> list[dict[str, Any]]:
    """The events' data, after checking each frame's SSE shape and name."""
    events = []
    for frame in frames:
        head, data, tail = frame.split(b"\n", 2)
        assert head.startswith(b"event: ") and data.startswith(b"data: ") and tail == b"\n"
        event = msgspec.json.decode(data[len(b"data: ") :])
        assert event["type"] == head[len(b"event: ") :].decode()
        events.append(event)
    return events


def run(chunks: list[dict[str, Any]]) -> list[bytes]:
    stream = MessageStream(message_id="msg_s", model="llama-3-8b")
    frames = stream.start()
    for chunk in chunks:
        frames += stream.feed(chunk)
    return frames + stream.finish()


def delta(finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "id": "gen-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": fields, "finish_reason": finish}],
    }


USAGE = {"id": "gen-1", "choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}}
X_POOL = {"provider": "prv_1", "cost_usd": 0.0002}


def call(index: int, arguments: str, id: str | None = None, name: str | None = None) -> dict[str, Any]:
    piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if id is not None:
        piece |= {"id": id, "type": "function"}
        piece["function"]["name"] = name
    return piece


TEXT_CHUNKS = [
    delta(role="assistant", content=""),
    delta(content="Hel"),
    delta(content="lo!"),
    delta("stop"),
    USAGE | {"x_pool": X_POOL},
]
TOOL_CHUNKS = [
    delta(role="assistant", content="Checking"),
    delta(content="."),
    delta(tool_calls=[call(0, "", "call_a", "get_weather")]),
    delta(tool_calls=[call(0, '{"ci')]),
    delta(tool_calls=[call(0, 'ty": "Par')]),
    delta(tool_calls=[call(0, 'is"}')]),
    delta(tool_calls=[call(1, '{"tz":', "call_b", "get_time")]),
    delta(tool_calls=[call(1, ' "UTC"}')]),
    delta("tool_calls"),
    USAGE,
    {"id": "gen-1", "choices": [], "x_pool": X_POOL},
]


def test_stream_text() -> None:
    events = parse(run(TEXT_CHUNKS))
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0]["message"]
    assert start["id"] == "msg_s" and start["model"] == "llama-3-8b" and start["content"] == []
    assert start["stop_reason"] is None and start["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert events[2] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [e["delta"] for e in events[3:5]] == [
        {"type": "text_delta", "text": "Hel"},
        {"type": "text_delta", "text": "lo!"},
    ]
    assert events[6] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 21, "output_tokens": 9},
        "x_pool": X_POOL,
    }


def test_stream_text_then_tool_calls() -> None:
    events = parse(run(TOOL_CHUNKS))
    shape = [(e["type"], e.get("index")) for e in events]
    assert shape == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[6]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}
    assert "".join(e["delta"]["partial_json"] for e in events[7:10]) == '{"city": "Paris"}'
    assert events[11]["content_block"]["id"] == "call_b"
    assert "".join(e["delta"]["partial_json"] for e in events[12:14]) == '{"tz": "UTC"}'
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["x_pool"] == X_POOL


def test_stream_arguments_before_name_and_no_usage() -> None:
    chunks = [
        delta(tool_calls=[{"index": 0, "id": "c1", "function": {"arguments": "{}"}}]),
        delta(tool_calls=[{"index": 0, "function": {"name": "get_time"}}]),
        delta("tool_calls"),
    ]
    events = parse(run(chunks))
    assert [e["type"] for e in events][2:5] == ["content_block_start", "content_block_delta", "content_block_stop"]
    assert events[2]["content_block"]["name"] == "get_time" and events[3]["delta"]["partial_json"] == "{}"
    assert events[-2]["usage"] == {"output_tokens": 0} and "x_pool" not in events[-2]


def test_stream_calls_without_index() -> None:
    """Backends that leave ``index`` out: a new id is a new call, a piece without one continues."""
    chunks = [
        delta(tool_calls=[{"id": "c1", "function": {"name": "get_time", "arguments": "{}"}}]),
        delta(tool_calls=[{"id": "c2", "function": {"name": "get_weather", "arguments": '{"city":'}}]),
        delta(tool_calls=[{"function": {"arguments": ' "Oslo"}'}}]),
        delta("tool_calls"),
    ]
    message = final_message(run(chunks))
    assert [(b.id, b.input) for b in message.content] == [("c1", {}), ("c2", {"city": "Oslo"})]


def test_stream_fail() -> None:
    stream = MessageStream(message_id="msg_f", model="m")
    frames = stream.start() + stream.feed(delta(content="Hi"))
    error = parse(stream.fail(502, "The provider failed"))
    assert error == [{"type": "error", "error": {"type": "api_error", "message": "The provider failed"}}]
    assert stream.finish() == []
    assert len(frames) == 4


def final_message(frames: list[bytes]) -> Any:
    """The message Anthropic's SDK builds out of the events, with its own accumulator."""
    snapshot, buffers = None, {}
    for event in parse(frames):
        if event["type"] != "ping":
            snapshot = streaming.accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    return snapshot


def test_sdk_accumulates_text() -> None:
    message = final_message(run(TEXT_CHUNKS))
    assert [block.text for block in message.content] == ["Hello!"]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 9)


def test_sdk_accumulates_tool_calls() -> None:
    message = final_message(run(TOOL_CHUNKS))
    text, weather, time = message.content
    assert text.text == "Checking."
    assert (weather.type, weather.id, weather.name, weather.input) == (
        "tool_use",
        "call_a",
        "get_weather",
        {"city": "Paris"},
    )
    assert (time.id, time.name, time.input) == ("call_b", "get_time", {"tz": "UTC"})
    assert message.stop_reason == "tool_use" and message.usage.input_tokens == 21


def sdk_http() -> Any:
    """The HTTP library Anthropic's SDK is built on (httpx, or httpx2 in newer SDKs)."""
    http = getattr(base_client, "httpx2", None) or getattr(base_client, "httpx", None)
    assert http is not None and hasattr(http, "MockTransport"), "the SDK's HTTP library has changed"
    return http


def test_sdk_client_streams_and_creates() -> None:
    """The SDK's own client, over an in-memory transport (no sockets), reads both replies."""
    http = sdk_http()

    def handler(req: Any) -> Any:
        body = msgspec.json.decode(req.content, type=MessagesRequest)
        assert body.messages[0].content == "weather?"
        if body.stream:
            events = b"".join(run(TOOL_CHUNKS))
            return http.Response(200, headers={"content-type": "text/event-stream"}, content=events)
        return http.Response(
            200, json=from_chat(completion({"content": "Sunny."}), message_id="msg_c", model=body.model)
        )

    client = anthropic.Anthropic(
        api_key="sk-test", base_url="http://pool.test", http_client=http.Client(transport=http.MockTransport(handler))
    )
    params: dict[str, Any] = {
        "model": "llama-3-8b",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "weather?"}],
    }
    with client.messages.stream(**params) as stream:
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].input == {"city": "Paris"} and message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 9)
    created = client.messages.create(**params)
    assert created.content[0].text == "Sunny." and created.usage.output_tokens == 5


def test_sdk_client_raises_a_stream_error() -> None:
    http = sdk_http()
    stream = MessageStream(message_id="msg_e", model="m")
    events = b"".join(stream.start() + stream.feed(delta(content="Hi")) + stream.fail(503, "no capacity"))

    def handler(req: Any) -> Any:
        return http.Response(200, headers={"content-type": "text/event-stream"}, content=events)

    client = anthropic.Anthropic(
        api_key="sk-test",
        base_url="http://pool.test",
        max_retries=0,
        http_client=http.Client(transport=http.MockTransport(handler)),
    )
    with (
        pytest.raises(anthropic.APIStatusError, match="overloaded_error"),
        client.messages.stream(model="m", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as s,
    ):
        s.get_final_message()


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_body(status: int, kind: str) -> None:
    assert error_body(status, "nope") == {"type": "error", "error": {"type": kind, "message": "nope"}}


def test_arguments_for_a_block_already_stopped_are_not_sent_to_it() -> None:
    first = {"index": 0, "id": "t1", "function": {"name": "a", "arguments": "{}"}}
    second = {"index": 1, "id": "t2", "function": {"name": "b", "arguments": "{}"}}
    late = {"index": 0, "function": {"arguments": " "}}  # the first call's, after the second began
    events = parse(run([delta(tool_calls=[first]), delta(tool_calls=[second]), delta(tool_calls=[late])]))
    stopped: set[int] = set()
    for event in events:
        if event["type"] == "content_block_stop":
            stopped.add(event["index"])
        elif event["type"] == "content_block_delta":
            assert event["index"] not in stopped, event
