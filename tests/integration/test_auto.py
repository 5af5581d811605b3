"""``model: "auto"`` through real coordinator and agent processes and the OpenAI SDK (stand-in
backends): the pool picks the cheapest model that fits — by context window, tools and JSON mode, the
key's allowed models and price cap, and who can serve now — says why in ``x_pool.auto``, and refuses
clearly when nothing fits. ``/v1/models`` lists ``auto``.

Agents: ``smollm2-135m`` (8k context, no tools) at $0.1/$0.2, ``qwen2.5-7b`` (32k, tools and JSON)
at $0.5/$1, ``llama-3.1-8b`` (128k, tools and JSON) at $2/$4 per 1M tokens."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from scripts import localpool
from tests.harness import Pool

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def chooser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    pool = Pool(tmp_path_factory.mktemp("auto"))
    pool.start()
    try:
        for slug, price_in, price_out in (
            ("smollm2-135m", "0.1", "0.2"),
            ("qwen2.5-7b", "0.5", "1"),
            ("llama-3.1-8b", "2", "4"),
        ):
            pool.agent(pool.standin(), [slug], price_in=price_in, price_out=price_out, max_concurrency=8)
        yield pool
    finally:
        pool.stop()


def _auto(pool: Pool, key: str | None = None, **body: Any) -> tuple[dict[str, Any], str]:
    client = openai.OpenAI(base_url=f"{pool.url}/v1", api_key=key or pool.key, max_retries=0)
    reply = client.chat.completions.create(model="auto", **{"messages": MSG, **body})
    return dict((reply.model_extra or {})["x_pool"]["auto"]), reply.model


def test_auto_is_listed_and_picks_the_cheapest_model_that_fits(chooser: Pool) -> None:
    listed = httpx.get(f"{chooser.url}/v1/models", timeout=10).json()["data"]
    assert listed[0]["id"] == "auto" and listed[0]["providerCount"] == 1
    auto, model = _auto(chooser)
    assert auto["chosen"] == model == "smollm2-135m"
    assert auto["considered"] == ["smollm2-135m", "qwen2.5-7b", "llama-3.1-8b"]  # cheapest first
    assert "cheapest of 3" in auto["reason"]


def test_auto_needs_tools_json_and_room_for_the_prompt(chooser: Pool) -> None:
    assert _auto(chooser, tools=[TOOL])[0]["chosen"] == "qwen2.5-7b"  # smollm2 calls no tools
    assert _auto(chooser, response_format={"type": "json_object"})[0]["chosen"] == "qwen2.5-7b"
    long = [{"role": "user", "content": "word " * 2000}]  # 10 KB: more than smollm2's 8k context can hold
    assert _auto(chooser, messages=long)[0]["chosen"] == "qwen2.5-7b"
    longer = [{"role": "user", "content": "word " * 8000}]  # 40 KB: only llama's 128k
    auto, model = _auto(chooser, messages=longer, max_tokens=64)
    assert auto["chosen"] == model == "llama-3.1-8b" and auto["considered"] == ["llama-3.1-8b"]


def test_auto_keeps_to_the_keys_policy_and_refuses_clearly(chooser: Pool) -> None:
    email = f"auto-{secrets.token_hex(3)}@example.com"
    (key,) = chooser.new_consumer(email, "1")
    key_id = chooser.query("SELECT id FROM api_keys ORDER BY id DESC LIMIT 1")[0][0]

    def policy(value: str) -> None:
        localpool.admin(chooser.env, "set-key-policy", "--key-id", str(key_id), "--policy", value)
        time.sleep(1.1)  # the CLI writes the database; the coordinator reads a cached key again within 1 s

    headers = {"authorization": f"Bearer {key}"}
    unnamed = httpx.post(f"{chooser.url}/v1/chat/completions", json={"messages": MSG}, headers=headers, timeout=30)
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "model"  # no policy: name one
    policy('{"models": ["qwen2.5", "llama-3.1"]}')  # families
    assert _auto(chooser, key)[0]["chosen"] == "qwen2.5-7b"
    unnamed = httpx.post(f"{chooser.url}/v1/chat/completions", json={"messages": MSG}, headers=headers, timeout=30)
    assert unnamed.status_code == 200 and unnamed.json()["model"] == "qwen2.5-7b"  # left out: auto among them
    policy('{"maxPrice": {"prompt": 1, "completion": 2}}')  # llama's price is over the cap
    assert _auto(chooser, key, messages=[{"role": "user", "content": "word " * 2000}])[0]["chosen"] == "qwen2.5-7b"
    policy('{"models": ["smollm2"]}')
    with pytest.raises(openai.BadRequestError) as nothing:  # no model the key may use calls tools
        _auto(chooser, key, tools=[TOOL])
    assert nothing.value.code == "invalid_request" and "tools" in str(nothing.value.message)
    policy('{"maxPrice": {"prompt": 0.01, "completion": 0.01}}')  # everyone is dearer
    with pytest.raises(openai.APIStatusError) as busy:
        _auto(chooser, key)
    assert busy.value.status_code == 503 and busy.value.code == "no_capacity"
