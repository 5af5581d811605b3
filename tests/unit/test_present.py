"""What a consumer is shown of a backend's reply: the pool's id and slug, API fields only, x_pool."""

from __future__ import annotations

import msgspec

from coordinator.market.present import Said, present
from coordinator.services.inference import XPool


def test_present_shows_the_pool_id_slug_and_api_fields_only() -> None:
    x_pool = XPool(request_id="req_1", provider=1, agent="agt_1", fallback=False, latency_ms=5, cost_usd=0.25)
    backend = (
        b'{"id":"chatcmpl-9","object":"chat.completion","created":3,"model":"/models/q4.gguf",'
        b'"system_fingerprint":"b0-unknown","timings":{"predicted_n":4},"x_pool":{"cost_usd":0},'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
    )
    shown, said = present(backend, "req_1", "smollm2-135m", x_pool)
    body = msgspec.json.decode(shown)
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "x_pool"]
    assert (body["id"], body["model"], body["created"]) == ("req_1", "smollm2-135m", 3)
    assert body["x_pool"] == {
        "request_id": "req_1",
        "provider": 1,
        "agent": "agt_1",
        "fallback": False,
        "latency_ms": 5,
        "cost_usd": 0.25,
    }
    assert (said.id, said.model) == ("chatcmpl-9", "/models/q4.gguf")
    chunk, _ = present(b'{"id":"c","model":"m","choices":[{"delta":{"content":"x"}}]}', "req_1", "slug")
    assert msgspec.json.decode(chunk) == {"id": "req_1", "model": "slug", "choices": [{"delta": {"content": "x"}}]}
    # What isn't a JSON object goes out as it came (the audit counts it as garbage).
    for odd in (b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"):
        assert present(odd, "req_1", "slug") == (odd, Said())
