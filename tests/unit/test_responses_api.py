"""The Responses API on chat completions: requests to chat bodies, chat replies and chunks back."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from coordinator.market.responses_api import ResponsesRequest, ResponseStream, ShapeError, from_chat, to_chat
from shared.openai import ChatCompletionRequest

EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)  # the SDK (a dev dependency) checks every event

RID = "resp_abc"


def request(**body: Any) -> ResponsesRequest:
    return msgspec.json.decode(msgspec.json.encode({"model": "m", "input": "hi", **body}), type=ResponsesRequest)


def chat_body(req: ResponsesRequest) -> dict[str, Any]:
    """``to_chat``, checked to pass the chat path's own validation."""
    body = to_chat(req)
    msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest)
    return body


def refused(req: ResponsesRequest) -> ShapeError:
    with pytest.raises(ShapeError) as info:
        to_chat(req)
    return info.value


def sdk_response(body: dict[str, Any]) -> None:
    Response.model_validate(body)


def events(frames: list[bytes]) -> list[dict[str, Any]]:
    """The SSE frames' data, each checked against its ``event:`` line and the SDK's event union."""
    out = []
    for frame in frames:
        head, data, end = frame.split(b"\n", 2)
        event = msgspec.json.decode(data.removeprefix(b"data: "))
        assert head == b"event: " + event["type"].encode() and end == b"\n"
        EVENT.validate_python(event)
        out.append(event)
    return out


# --- to_chat ----------------------------------------------------------------------------------


def test_text_input_becomes_one_user_message_with_the_settings_mapped() -> None:
    req = request(
        instructions="Be brief.",
        max_output_tokens=50,
        temperature=0.5,
        top_p=0.9,
        metadata={"k": "v"},
        user="u1",
        store=True,
        provider={"sort": "price"},
        reasoning={"effort": "low"},
        truncation="auto",
        include=["message.output_text.logprobs"],
        some_future_field={"x": 1},
    )
    assert chat_body(req) == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "stream": False,
        "max_tokens": 50,
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"k": "v"},
        "user": "u1",
        "provider": {"sort": "price", "allow_fallbacks": True},
    }


def test_stream_asks_for_usage() -> None:
    body = chat_body(request(stream=True))
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_message_items_with_parts_and_easy_messages() -> None:
    req = request(
        input=[
            {"role": "developer", "content": "rules"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                ],
            },
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a dot"}]},
        ]
    )
    assert chat_body(req)["messages"] == [
        {"role": "system", "content": "rules"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "a dot"}]},
    ]


def test_function_calls_and_outputs_round_trip_as_history() -> None:
    req = request(
        input=[
            {"role": "user", "content": "weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]},
        ]
    )
    messages = chat_body(req)["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
        ],
    }
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
    ]


def test_a_function_call_joins_the_assistant_text_before_it() -> None:
    req = request(
        input=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "let me look"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]
    )
    last = chat_body(req)["messages"][-1]
    assert last["content"] == "let me look" and [c["id"] for c in last["tool_calls"]] == ["c"]


def test_function_tools_and_tool_choice() -> None:
    tool = {"type": "function", "name": "weather", "description": "d", "parameters": {"type": "object"}, "strict": True}
    body = chat_body(request(tools=[tool], tool_choice={"type": "function", "name": "weather"}))
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "weather", "description": "d", "parameters": {"type": "object"}, "strict": True},
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert (
        chat_body(request(tools=[tool], tool_choice="required", parallel_tool_calls=False))["tool_choice"] == "required"
    )
    assert "tool_choice" not in chat_body(request())


def test_text_formats_become_response_formats() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = {"type": "json_schema", "name": "out", "schema": schema, "strict": True}
    assert chat_body(request(text={"format": fmt}))["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": schema, "strict": True},
    }
    assert chat_body(request(text={"format": {"type": "json_object"}}))["response_format"] == {"type": "json_object"}
    assert "response_format" not in chat_body(request(text={"format": {"type": "text"}}))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"input": []}, "input"),
        ({"tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]}, "tools[1].type"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        ({"input": [{"role": "user", "content": "a"}, {"type": "reasoning", "summary": []}]}, "input[1].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
    ],
)
def test_refusals_name_the_field(body: dict[str, Any], param: str) -> None:
    assert refused(request(**body)).param == param


def test_previous_response_id_says_what_to_do() -> None:
    assert "send the whole conversation in `input`" in refused(request(previous_response_id="resp_1")).message


def test_request_types_are_checked_on_decoding() -> None:
    for body in (
        {"metadata": {str(i): "v" for i in range(17)}},
        {"tool_choice": {"type": "file_search"}},
        {"input": 3},
    ):
        with pytest.raises(msgspec.ValidationError):
            request(**body)


# --- from_chat --------------------------------------------------------------------------------

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def completion(message: dict[str, Any], finish: str = "stop", **more: Any) -> dict[str, Any]:
    return {
        "id": "gen_1",
        "object": "chat.completion",
        "created": 1,
        "model": "slug",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": USAGE,
        **more,
    }


def test_from_chat_text() -> None:
    req = request(instructions="Be brief.", metadata={"k": "v"})
    body = from_chat(completion({"content": "Hello"}, x_pool={"cost_usd": 0.1}), req, response_id=RID, created_at=5)
    assert (body["id"], body["object"], body["created_at"], body["status"], body["model"]) == (
        RID,
        "response",
        5,
        "completed",
        "slug",
    )
    assert body["output"] == [
        {
            "id": "msg_abc",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}],
        }
    ]
    assert body["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 10,
    }
    assert body["x_pool"] == {"cost_usd": 0.1}
    assert (body["instructions"], body["metadata"], body["error"], body["incomplete_details"]) == (
        "Be brief.",
        {"k": "v"},
        None,
        None,
    )
    assert Response.model_validate(body).output_text == "Hello"


def test_from_chat_tool_calls() -> None:
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
    ]
    req = request(tools=[{"type": "function", "name": "weather"}, {"type": "function", "name": "time"}])
    body = from_chat(
        completion({"content": None, "tool_calls": calls}, "tool_calls"), req, response_id=RID, created_at=5
    )
    assert body["output"] == [
        {
            "id": "fc_abc",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_1",
            "name": "weather",
            "arguments": '{"city":"Paris"}',
        },
        {
            "id": "fc_abc_1",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_2",
            "name": "time",
            "arguments": "{}",
        },
    ]
    assert body["status"] == "completed" and "x_pool" not in body
    assert [t["name"] for t in body["tools"]] == ["weather", "time"]
    sdk_response(body)


def test_from_chat_length_is_incomplete() -> None:
    body = from_chat(
        completion({"content": "Hel"}, "length"), request(max_output_tokens=2), response_id=RID, created_at=5
    )
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["max_output_tokens"] == 2
    sdk_response(body)


def test_from_chat_maps_cached_and_reasoning_tokens() -> None:
    usage = {
        **USAGE,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    body = from_chat(completion({"content": "x"}, usage=usage), request(), response_id=RID, created_at=5)
    assert body["usage"]["input_tokens_details"]["cached_tokens"] == 4
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == 2


# --- streaming --------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **more: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "gen_1", "object": "chat.completion.chunk", "created": 1, "model": "slug", "choices": choices, **more}


def run(stream: ResponseStream, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    frames = stream.start()
    for c in chunks:
        frames += stream.feed(c)
    frames += stream.finish()
    got = events(frames)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    return got


def test_stream_text() -> None:
    stream = ResponseStream(request(stream=True), response_id=RID, created_at=5, model="slug")
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({}, "stop"),
        chunk(usage=USAGE, x_pool={"cost_usd": 0.1}),
    ]
    got = run(stream, chunks)
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    assert [e["delta"] for e in got if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert got[6]["text"] == "Hello" and got[6]["item_id"] == "msg_abc"
    final = got[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 10
    assert final["x_pool"] == {"cost_usd": 0.1}
    assert Response.model_validate(final).output_text == "Hello"
    assert stream.feed(chunk({"content": "late"})) == [] and stream.finish() == []


def test_stream_tool_calls_with_split_arguments() -> None:
    stream = ResponseStream(request(stream=True), response_id=RID, created_at=5, model="slug")
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    second = {"index": 1, "id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}}
    chunks = [
        chunk({"role": "assistant", "content": "Looking"}),
        chunk({"tool_calls": [first]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [second]}),
        chunk({}, "tool_calls"),
        chunk(usage=USAGE),
    ]
    got = run(stream, chunks)
    kinds = [e["type"] for e in got]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",  # the text ends where the first call starts
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",  # items stream one at a time: the second call closes the first
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = [e for e in got if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["id"]) for e in added] == [(0, "msg_abc"), (1, "fc_abc"), (2, "fc_abc_1")]
    assert added[1]["item"]["arguments"] == "" and added[1]["item"]["call_id"] == "call_1"
    done = [e for e in got if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in done] == ['{"city":"Paris"}', "{}"]
    output = got[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["message", "function_call", "function_call"]
    assert output[1]["arguments"] == '{"city":"Paris"}' and output[1]["status"] == "completed"
    sdk_response(got[-1]["response"])


def test_stream_cut_by_length_is_incomplete() -> None:
    stream = ResponseStream(request(stream=True), response_id=RID, created_at=5, model="slug")
    got = run(stream, [chunk({"content": "Hel"}), chunk({}, "length"), chunk(usage=USAGE)])
    assert got[-1]["type"] == "response.incomplete"
    final = got[-1]["response"]
    assert (
        final["incomplete_details"] == {"reason": "max_output_tokens"} and final["output"][0]["status"] == "incomplete"
    )


def test_stream_fail() -> None:
    stream = ResponseStream(request(stream=True), response_id=RID, created_at=5, model="slug")
    frames = (
        stream.start()
        + stream.feed(chunk({"content": "Hel"}))
        + stream.fail("provider_error", "the provider went away")
    )
    got = events(frames)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    failed = got[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {
        "code": "server_error",
        "message": "the provider went away",
        "type": "provider_error",
    }
    assert failed["response"]["output"][0]["status"] == "incomplete"
    assert stream.finish() == [] and stream.fail("server_error", "again") == []
    sdk_response(failed["response"])


def test_stream_skips_what_is_not_a_chunk() -> None:
    stream = ResponseStream(request(stream=True), response_id=RID, created_at=5, model="slug")
    stream.start()
    assert stream.feed({"choices": "nonsense"}) == []


def test_stream_call_waits_for_its_name_and_an_empty_reply_has_an_empty_message() -> None:
    stream = ResponseStream(request(stream=True), response_id=RID, created_at=5, model="slug")
    got = run(
        stream,
        [
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"arguments": "{}"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}),
            chunk({}, "tool_calls"),
        ],
    )
    added = next(e for e in got if e["type"] == "response.output_item.added")
    assert added["item"]["name"] == "f" and got[got.index(added) + 1]["delta"] == "{}"
    assert got[-1]["response"]["usage"] is None  # no usage chunk came

    empty = run(ResponseStream(request(stream=True), response_id=RID, created_at=5, model="slug"), [chunk({}, "stop")])
    assert empty[-1]["response"]["output"][0]["content"][0]["text"] == ""
    sdk_response(empty[-1]["response"])


def test_stream_items_run_one_at_a_time() -> None:
    stream = ResponseStream(request(stream=True), response_id=RID, created_at=5, model="slug")
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    late = {"index": 0, "function": {"arguments": " "}}  # the call's, after text began
    got = run(stream, [chunk({"tool_calls": [call]}), chunk({"content": "then"}), chunk({"tool_calls": [late]})])
    assert [e["item"]["type"] for e in got if e["type"] == "response.output_item.added"] == ["function_call", "message"]
    open_items: set[int] = set()
    for event in got:
        if event["type"] == "response.output_item.added":
            assert not open_items, "an item began while another was open"
            open_items.add(event["output_index"])
        elif event["type"] == "response.output_item.done":
            open_items.discard(event["output_index"])
        elif "output_index" in event:
            assert event["output_index"] in open_items, event
