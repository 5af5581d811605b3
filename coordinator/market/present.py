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
from msgspec import UNSET, Raw, UnsetType


class _Payload(msgspec.Struct, omit_defaults=True):
    """The top-level fields of a chat completion and of a chunk, as the OpenAI API defines them,
    plus ``error`` (a backend's mid-stream error object); any other field is dropped on decoding.
    Values stay raw JSON: nothing below the top level is decoded again (the audit already read the
    choices)."""

    id: Raw | UnsetType = UNSET
    object: Raw | UnsetType = UNSET
    created: Raw | UnsetType = UNSET
    model: Raw | UnsetType = UNSET
    choices: Raw | UnsetType = UNSET
    usage: Raw | UnsetType = UNSET
    error: Raw | UnsetType = UNSET


class _Shown(_Payload, omit_defaults=True):
    x_pool: Any = UNSET  # the pool's, never a backend's (``_Payload`` drops theirs)


class Said(msgspec.Struct):
    """What a backend said of itself in a payload: kept for the request log, never shown."""

    id: str | None = None
    model: str | None = None


_decode = msgspec.json.Decoder(_Payload).decode
_encode = msgspec.json.Encoder().encode
_text = msgspec.json.Decoder(str | None).decode


def present(payload: bytes, generation_id: str, model: str, x_pool: Any = None) -> tuple[bytes, Said]:
    """The payload as the consumer sees it, and what the backend said of itself. A payload that is
    not a JSON object goes out unchanged (the audit already counts it as garbage)."""
    try:
        body = _decode(payload)
    except msgspec.DecodeError:  # not JSON, or not an object
        return payload, Said()
    shown = _Shown(
        id=Raw(_encode(generation_id)),
        object=body.object,
        created=body.created,
        model=Raw(_encode(model)),
        choices=body.choices,
        usage=body.usage,
        error=body.error,
        x_pool=UNSET if x_pool is None else x_pool,
    )
    return _encode(shown), Said(_said(body.id), _said(body.model))


def _said(value: Raw | UnsetType) -> str | None:
    if isinstance(value, UnsetType):
        return None
    try:
        text = _text(value)
    except msgspec.DecodeError:  # not a string
        return None
    return text[:200] if text is not None else None
