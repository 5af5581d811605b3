"""The agent protocol's codec: round trips, unknown tags, newer peers' fields, garbage and deep nesting."""

from __future__ import annotations

import msgspec
import pytest

from shared import protocol
from shared.protocol import JobChunk, ProtocolError, UnknownMessage


def test_protocol_round_trip_unknown_tag_and_garbage() -> None:
    decoder = protocol.agent_decoder()
    chunk = JobChunk(job_id="j", seq=3, data=b'{"a":1}')
    assert decoder.decode(protocol.encode(chunk)) == chunk
    assert decoder.decode(msgspec.msgpack.encode({"type": "job.eta", "pct": 5})) == UnknownMessage("job.eta")
    # a newer peer's extra fields are ignored
    extended = msgspec.msgpack.encode({"type": "heartbeat", "in_flight": 2, "gpu_temp": 71})
    assert decoder.decode(extended) == protocol.Heartbeat(in_flight=2)
    for garbage in (b"\xc1\xc1", b"", msgspec.msgpack.encode([1, 2]), msgspec.msgpack.encode({"type": "hello"})):
        with pytest.raises(ProtocolError):
            decoder.decode(garbage)
    # the coordinator's messages are not valid from an agent
    assert isinstance(decoder.decode(protocol.encode(protocol.JobCancel(job_id="j"))), UnknownMessage)


def test_deeply_nested_frames_are_protocol_errors() -> None:
    decoder = protocol.agent_decoder()
    with pytest.raises(ProtocolError):
        decoder.decode(b"\x91" * 100_000 + b"\xc0")
    with pytest.raises(ProtocolError):
        decoder.decode(b"\x81\xa4type" + b"\x91" * 100_000 + b"\xc0")
