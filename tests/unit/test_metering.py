"""Metering: the hold covers the worst case, bills are capped, cut streams bill what was delivered."""

from __future__ import annotations

import msgspec

from coordinator.money.metering import TEMPLATE_ALLOWANCE, Meter, Price, output_bound, prompt_bound, prompt_estimate
from coordinator.trust import audit
from shared.openai import ChatCompletionRequest
from shared.protocol import Usage


def test_hold_covers_the_worst_case_and_bills_are_capped() -> None:
    request = msgspec.json.decode(
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":7}', type=ChatCompletionRequest
    )
    meter = Meter(prompt_bound(b"x" * 100), output_bound(request, 4096))
    assert (meter.prompt_bound, meter.completion_bound) == (100 + TEMPLATE_ALLOWANCE, 7)
    assert meter.hold_amount(Price(2, 3)) == (100 + TEMPLATE_ALLOWANCE) * 2 + 7 * 3
    unbounded = msgspec.json.decode(
        b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', type=ChatCompletionRequest
    )
    assert output_bound(unbounded, 8192) == 8192
    meter.usage = Usage(prompt_tokens=10, completion_tokens=50, total_tokens=60)
    bill = meter.bill(completed=True, stream=False)
    assert (bill.prompt_tokens, bill.completion_tokens, bill.capped) == (10, 7, True)
    meter.usage = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
    assert not meter.bill(completed=True, stream=True).capped


def test_cut_streams_bill_only_delivered_text() -> None:
    meter = Meter(100, 50)
    output = audit.Output()
    for chunk in (
        b'{"choices":[{"delta":{"role":"assistant","content":null}}]}',
        b'{"choices":[{"delta":{"content":"Hel"}}]}',
        b'{"choices":[{"delta":{"content": "lo"}}]}',
        b'{"choices":[{"delta":{"content":""}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\\"a"}}]}}]}',
        b'{"choices":[{"delta":{},"finish_reason":"stop"}]}',
        b'{"choices":[],"content":"outside","delta":{"content":"outside"}}',
    ):
        meter.delivered += output.read(chunk)
    assert meter.delivered == 3
    meter.usage = Usage(prompt_tokens=9, completion_tokens=40, total_tokens=49)
    cut = meter.bill(completed=False, stream=True)
    assert (cut.prompt_tokens, cut.completion_tokens) == (0, 3)
    hung_up = Meter(100, 50, prompt_tokens_estimate=30)
    hung_up.delivered = 3
    left = hung_up.bill(completed=False, stream=True, consumer_left=True)
    assert (left.prompt_tokens, left.completion_tokens) == (30, 3)  # the prompt was processed
    assert meter.bill(completed=False, stream=False).completion_tokens == 0
    meter.usage = None
    assert meter.bill(completed=True, stream=True).completion_tokens == 3


def test_prompt_estimate_counts_message_text() -> None:
    request = msgspec.json.decode(
        b'{"model":"m","messages":[{"role":"system","content":"12345678"},'
        b'{"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"data:x"}}]}]}',
        type=ChatCompletionRequest,
    )
    assert prompt_estimate(request) == 12 // 4 + 2 * 4
