"""What the consumer sees of a backend's payload (a stream chunk or a whole reply).

The payload is the agent's; the consumer is the pool's. So ``id`` is the pool's generation id (the
one ``GET /v1/generation/{id}`` takes, the same in every chunk of a stream), ``model`` is the slug
the consumer asked for and was billed for, and only the fields the OpenAI API defines reach the
consumer: a backend's own (llama.cpp's ``timings``, ``system_fingerprint``, an ``x_pool`` an agent
made up) would reveal the provider's setup or mislead. What the backend called itself is returned
for the request log.
"""

from __future__ import annotations

from typing import Any

import msgspec

# Top-level fields of a chat completion and of a chunk, as the OpenAI API defines them, plus
# ``error`` (a backend's mid-stream error object).
API_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage", "error"})

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class Said(msgspec.Struct):
    """What a backend said of itself in a payload: kept for the request log, never shown."""

    id: str | None = None
    model: str | None = None


def present(payload: bytes, generation_id: str, model: str, x_pool: Any = None) -> tuple[bytes, Said]:
    """The payload as the consumer sees it, and what the backend said of itself. A payload that is
    not a JSON object goes out unchanged (the audit already counts it as garbage)."""
    try:
        body = _decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return payload, Said()
    if not isinstance(body, dict):
        return payload, Said()
    said = Said(_text(body.get("id")), _text(body.get("model")))
    shown = {name: value for name, value in body.items() if name in API_FIELDS}
    shown["id"] = generation_id
    shown["model"] = model
    if x_pool is not None:
        shown["x_pool"] = x_pool
    return _encode(shown), said


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) else None
