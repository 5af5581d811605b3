"""The chat endpoint through real coordinator and agent processes where llama.cpp cannot serve the
test: a clear 4xx for every bad field, malformed body, unknown model or key and unknown route (no
backend is reached), and the fields that reach a backend, which only the stand-in can show (it serves
back the body it received). The response shapes with llama.cpp are in tests/e2e/test_chat_api.py."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.harness import Pool, last_request

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def served(pool: Pool) -> str:
    """One agent serving `smollm2-135m` from a stand-in, which shows the body it received; its URL."""
    backend = pool.standin(chunks=4)
    pool.agent(backend, ["smollm2-135m=standin-model"])
    return backend


def test_api_fields_reach_the_backend_and_others_do_not(pool: Pool, served: str) -> None:
    body = {
        "model": "smollm2-135m",
        "messages": MSG,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 7,
        "max_completion_tokens": 7,
        "stop": ["\n"],
        "seed": 42,
        "ignore_eos": True,  # a backend-specific field the pool does not know
    }
    assert pool.post(body).status_code == 200
    seen = last_request(served)
    assert seen.pop("model") == "standin-model"
    # A field outside the API could change how much a backend generates: it does not go through.
    assert seen == {k: v for k, v in body.items() if k not in ("model", "ignore_eos")}


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"model": None}, "model"),
        ({"model": 5}, "model"),
        ({"model": ""}, "model"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0].type"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"n": 3}, "n"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"presence_penalty": 9}, "presence_penalty"),
        ({"frequency_penalty": -9}, "frequency_penalty"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"logprobs": "x"}, "logprobs"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"tools": {}}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"parallel_tool_calls": "x"}, "parallel_tool_calls"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        ({"user": 7}, "user"),
    ],
)
def test_bad_fields_get_400_with_param(pool: Pool, patch: dict[str, object], param: str) -> None:
    body: dict[str, object] = {"model": "smollm2-135m", "messages": MSG}
    for key, value in patch.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    response = pool.post(body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "JSON"),
        (b"[1,2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"\xff\xfe", "JSON"),
    ],
)
def test_malformed_bodies_get_400(pool: Pool, content: bytes, fragment: str) -> None:
    response = pool.post(content=content)
    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


def test_unknown_model_and_bad_keys(pool: Pool) -> None:
    response = pool.post({"model": "no-such-model", "messages": MSG})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "invalid_request_error",
        "code": "model_not_found",
        "param": "model",
    }
    bodies = set()
    wrong = pool.key[:-1] + ("x" if pool.key[-1] != "x" else "y")  # one character off, never the key itself
    for key in ("", "pool_live_short", wrong, pool.token, "Bearer"):
        response = pool.post({"model": "smollm2-135m", "messages": MSG}, key=key)
        assert response.status_code == 401
        bodies.add(response.content)
    assert len(bodies) == 1  # every auth failure looks the same
    stranger = openai.OpenAI(base_url=f"{pool.url}/v1", api_key="pool_live_nope", max_retries=0)
    assert stranger.models.list().object == "list"  # the directory is public
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model="smollm2-135m", messages=MSG)  # type: ignore[arg-type]
    # auth comes before body validation
    assert pool.post(content=b"{bad", key="").status_code == 401


def test_unknown_route_and_method_use_the_envelope(pool: Pool) -> None:
    missing = httpx.get(f"{pool.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{pool.url}/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
    # Every response carries a request id, routed or not, and only one.
    for response in (missing, wrong, httpx.get(f"{pool.url}/healthz")):
        assert response.headers["x-request-id"].startswith("req_")
        assert len(response.headers.get_list("x-request-id")) == 1
