"""What agents and the upstream share for talking to backends: SSE parsing and the body sent on."""

from __future__ import annotations

import msgspec

from shared.backend import SSEParser, prepare_body


def test_sse_parser_handles_split_events_and_crlf() -> None:
    parser = SSEParser()
    stream = b'data: {"a":1}\n\ndata: {"b"' + b":2}\r\n\r\n: comment\n\ndata: [DONE]\n\n"
    out: list[bytes] = []
    for i in range(len(stream)):
        out += parser.feed(stream[i : i + 1])
    assert out == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


def test_prepare_body_keeps_unknown_fields_and_forces_usage() -> None:
    raw = b'{"model":"slug","messages":[],"ignore_eos":true,"stream":true,"stream_options":{"x":1}}'
    body = msgspec.json.decode(prepare_body(raw, "backend-name", stream=True))
    assert body["model"] == "backend-name"
    assert body["ignore_eos"] is True
    assert body["stream_options"] == {"x": 1, "include_usage": True}
    assert "stream_options" not in msgspec.json.decode(prepare_body(b'{"model":"a"}', "b", stream=False))
