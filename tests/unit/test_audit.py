"""The audit of every job: what a reply's output can be billed for (text inside the choices, tool
calls bounded by their bytes), and each check an agent's claims must pass."""

from __future__ import annotations

import msgspec

from coordinator.trust import audit
from coordinator.trust import scores as trust
from coordinator.trust.audit import read_output
from shared.protocol import Usage


def test_output_counts_only_text_inside_the_choices_and_bounds_tool_calls() -> None:
    output = audit.Output()
    payloads = [
        b'{"choices":[{"delta":{"content":"one"}}]}',
        b'{"choices":[{"delta":{"content":"\xc3\xa9t\xc3\xa9"}}]}',  # 4 non-ASCII bytes: up to 5 tokens
        b'{"choices":[{"delta":{"refusal":"no"}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"get","arguments":""}}]}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\":1}"}}]}}]}',
        b'{"content":"outside","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}',
        b'{"usage":{"completion_tokens":9},"delta":{"content":"nope"}}',
    ]
    assert [output.read(p) for p in payloads] == [1, 1, 1, 0, 1, 0, 0]
    assert output.deltas == 4
    # 1 + (1 + 4 non-ASCII bytes) + 1, the call's allowance and name, its arguments' bytes
    assert output.token_bound == 1 + 5 + 1 + audit.TOOL_CALL_ALLOWANCE + 3 + 7
    assert output.tool_calls == 1 and output.finish_reason == "tool_calls"
    assert output.text == "oneéténo"
    whole = audit.Output()
    assert whole.read(b'{"choices":[{"message":{"role":"assistant","content":"hello"}}]}') == 1
    assert whole.token_bound == 5  # a whole reply is bounded by its bytes


def test_the_audit_counts_tool_calls_and_prompt_reports() -> None:
    output = audit.read_output([b'{"choices":[{"delta":{"content":"a"},"finish_reason":null}]}'] * 5)
    output.read(b'{"choices":[{"delta":{"tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}]}')
    job = audit.Finished(
        stream=True,
        delivered=5,
        reported=Usage(prompt_tokens=10**9, completion_tokens=10**9),
        output=output,
        seconds=1.0,
        parameter_count=None,
        prompt_bound=300,
        prompt_estimate=7,
    )
    verdict = audit.judge(job)
    assert [kind for kind, _ in verdict.findings] == ["usage_inflated", "usage_inflated"]
    assert verdict.completion_tokens == 5 + audit.TOOL_CALL_ALLOWANCE + 1 + 2
    assert verdict.prompt_tokens == 7


def test_output_keeps_a_bounded_text_for_the_sanity_checks() -> None:
    output = audit.Output()
    piece = b'{"choices":[{"delta":{"content":"' + b"y" * 10_000 + b'"}}]}'
    for _ in range(20):
        output.read(piece)
    assert len(output.text) == audit.TEXT_KEPT
    assert output.deltas == 20


def _chunk(content: str) -> bytes:
    return msgspec.json.encode({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


STOP = msgspec.json.encode({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


def _job(payloads: list[bytes], *, reported: int | None, seconds: float = 1.0, stream: bool = True) -> audit.Finished:
    output = read_output(payloads)
    delivered = sum(1 for p in payloads if b'"content":"' in p and b'"content":""' not in p)
    usage = None if reported is None else Usage(5, reported, 5 + reported)
    return audit.Finished(stream, delivered, usage, output, seconds, 135_000_000)


def _kinds(job: audit.Finished) -> list[str]:
    return [kind for kind, _ in audit.judge(job).findings]


def test_audit_passes_honest_work() -> None:
    words = [_chunk(f"w{i} ") for i in range(40)]
    assert _kinds(_job([*words, STOP], reported=40)) == []
    assert _kinds(_job([*words, STOP], reported=44)) == []  # a few held-back tokens are tolerated
    assert _kinds(_job([*words, STOP], reported=None)) == []
    # llama.cpp holds the byte tokens of a multi-byte character back and sends them as one delta:
    # SmolLM2's real answer to "Say hello in Spanish." was 13 deltas for 24 tokens
    spanish = ["H", "ola", " in", " es", "pa", "ñ", "ol", "!", " 😊", "🌍", "🌍", "🌍", "🌍"]
    assert _kinds(_job([*(_chunk(piece) for piece in spanish), STOP], reported=24)) == []
    # non-stream: the whole reply, tokens bounded by its bytes
    body = msgspec.json.encode(
        {"choices": [{"index": 0, "message": {"content": "Paris is the capital."}, "finish_reason": "stop"}]}
    )
    assert _kinds(_job([body], reported=6, stream=False)) == []
    # a tool call's tokens include the template's markers around its name and arguments
    call = {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    tools = msgspec.json.encode(
        {"choices": [{"index": 0, "message": {"content": None, "tool_calls": [call]}, "finish_reason": "tool_calls"}]}
    )
    assert _kinds(_job([tools], reported=30, stream=False)) == []


def test_audit_catches_each_cheat_and_bills_what_it_can_vouch_for() -> None:
    words = [_chunk(f"w{i} ") for i in range(20)]
    inflated = audit.judge(_job([*words, STOP], reported=40))
    assert [k for k, _ in inflated.findings] == [trust.USAGE_INFLATED]
    assert inflated.completion_tokens == 20 and inflated.billable
    assert _kinds(_job([*words, STOP], reported=20, seconds=0.002)) == [trust.IMPLAUSIBLE_SPEED]
    assert not audit.judge(_job([*words, STOP], reported=20, seconds=0.002)).billable
    assert _kinds(_job([*words[:10], STOP], reported=10, seconds=0.001)) == []  # too few tokens to judge speed
    assert _kinds(_job([*[_chunk("zzz ")] * 16, STOP], reported=16)) == [trust.BAD_OUTPUT]
    assert _kinds(_job([STOP], reported=0)) == [trust.BAD_OUTPUT]  # empty output marked stop
    assert _kinds(_job([b'{"choices":[{"delta":{"content":"\xff\xfe"}}]}', STOP], reported=1)) == [trust.BAD_OUTPUT]
    assert _kinds(_job([_chunk("\ufffd" * 8), STOP], reported=1)) == [trust.BAD_OUTPUT]
    assert not audit.judge(_job([STOP], reported=0)).billable
    big = msgspec.json.encode({"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]})
    assert _kinds(_job([big], reported=500, stream=False)) == [trust.USAGE_INFLATED]


def test_output_reader_keeps_finish_reason_and_text() -> None:
    output = read_output([_chunk("Hel"), _chunk("lo"), STOP])
    assert (output.text, output.tool_calls, output.finish_reason, output.valid) == ("Hello", 0, "stop", True)
    assert (output.token_bound, output.deltas) == (2, 2)
    accented = read_output([_chunk("ñ"), _chunk("😊")])
    assert accented.token_bound == (1 + 2) + (1 + 4)  # one token per delta, plus one per non-ASCII byte
