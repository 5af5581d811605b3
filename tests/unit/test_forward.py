"""The body forwarded to a backend: only the API's fields, the priced output limit, no URLs to fetch."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.market.forward import backend_body, content_problem
from shared.openai import ChatCompletionRequest


def test_backends_get_only_the_api_and_the_priced_output_limit() -> None:
    raw = (
        b'{"model":"m","messages":[],"n_predict":4096,"ignore_eos":true,"top_k":5,'
        b'"max_completion_tokens":900,"options":{"num_predict":9},"provider":{"sort":"price"}}'
    )
    assert msgspec.json.decode(backend_body(raw, 10)) == {
        "model": "m",
        "messages": [],
        "top_k": 5,
        "max_completion_tokens": 10,
    }
    assert msgspec.json.decode(backend_body(b'{"model":"m","messages":[],"max_tokens":99}', 10))["max_tokens"] == 10
    assert msgspec.json.decode(backend_body(b'{"model":"m","messages":[]}', 10))["max_tokens"] == 10


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}, "messages[0].content[0].image_url.url"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "messages[0].content[0].image_url.url"),
        ({"type": "file", "text": "x"}, "messages[0].content[0].type"),
    ],
)
def test_content_parts_that_name_urls_are_refused(part: dict[str, object], param: str) -> None:
    body = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": [part]}]})
    problem = content_problem(msgspec.json.decode(body, type=ChatCompletionRequest))
    assert problem is not None and problem[0] == param
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": [inline]}]})
    assert content_problem(msgspec.json.decode(body, type=ChatCompletionRequest)) is None


def test_preferences_are_removed_from_the_forwarded_body() -> None:
    body = b'{"model":["a","b"],"provider":{"sort":"price"},"messages":[],"extra":{"provider":1}}'
    assert backend_body(body, 9) == b'{"model":["a","b"],"messages":[],"max_tokens":9}'
