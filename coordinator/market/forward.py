"""The request a backend sees: what the consumer asked for, as the pool priced it.

Only the fields of OpenAI's chat API that the pool validates (:class:`ChatCompletionRequest`) and a
short allow-list of sampling fields that backends share go through. Anything else (llama.cpp's
``n_predict``, Ollama's ``options``, vLLM's ``min_tokens`` or ``ignore_eos``) could change how much a
backend generates, and the price would no longer bind it. The output limit is always set, to the
bound the hold was priced for, under the name the consumer used (``max_tokens`` unless they sent only
``max_completion_tokens``).

Content parts that point at a URL are refused: a provider's backend (llama.cpp fetches http(s)
media for multimodal models) would fetch whatever the consumer names, from the provider's own
network. Images and audio come inline, as ``data:`` URLs and base64 data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from coordinator.core import bodies, dlp
from shared.openai import ChatCompletionRequest

# Sampling fields outside OpenAI's API that llama.cpp, vLLM and others read alike and that change
# only which tokens are drawn, never how many.
PASS_THROUGH = frozenset({"top_k", "min_p", "typical_p", "repetition_penalty", "repeat_penalty"})
FORWARDED = frozenset(ChatCompletionRequest.__struct_fields__) - {"provider", "metadata"} | PASS_THROUGH
CONTENT_PARTS = frozenset({"text", "image_url", "input_audio", "refusal"})

_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


def backend_body(raw: bytes, completion_bound: int) -> bytes:
    """The body to send a backend: the forwarded fields in the consumer's order, the output limit
    set to ``completion_bound``."""
    body: dict[str, Any] = bodies.decode(_decoder, raw)
    forwarded = {key: value for key, value in body.items() if key in FORWARDED}
    if "max_completion_tokens" in forwarded:
        forwarded["max_completion_tokens"] = completion_bound
    if "max_tokens" in forwarded or "max_completion_tokens" not in forwarded:
        forwarded["max_tokens"] = completion_bound
    return _encoder.encode(forwarded)


def content_problem(request: ChatCompletionRequest) -> tuple[str, str] | None:
    """``(param, message)`` for the first content part the pool does not forward, else ``None``."""
    for i, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if part.type not in CONTENT_PARTS:
                kinds = ", ".join(sorted(CONTENT_PARTS))
                return f"{where}.type", f"Content parts of type `{part.type[:40]}` are not supported (use {kinds})."
            if part.image_url is not None and not part.image_url.url.startswith("data:"):
                return (
                    f"{where}.image_url.url",
                    "Images must be sent inline as `data:` URLs: providers' servers do not fetch URLs.",
                )
    return None


@dataclass(frozen=True)
class Protected:
    """What data protection made of a backend body: the body to send (redacted where the policy
    says so), what each detector found, and which found something whose action is ``block`` or
    ``private`` (the first of each)."""

    body: bytes
    found: dict[str, int]
    blocked: str | None = None
    private: str | None = None


_KEPT = frozenset({"role", "type", "tool_call_id", "id"})  # message fields that hold no free text


def protect(body: bytes, actions: Mapping[str, str]) -> Protected:
    """Run the detectors ``actions`` names over the messages' text in ``body``; redact what the
    ``redact`` ones find (:class:`coordinator.core.dlp.Redactor`). Inline media (``data:`` URLs,
    base64 audio) is not text and is left alone."""
    decoded: dict[str, Any] = _decoder.decode(body)
    texts = list(_texts(decoded.get("messages")))
    detectors = tuple(name for name in dlp.DETECTORS if name in actions)
    found: Counter[str] = Counter()
    for text in texts:
        found += dlp.find(text, detectors)
    blocked = next((n for n in detectors if found[n] and actions[n] == dlp.BLOCK), None)
    private = next((n for n in detectors if found[n] and actions[n] == dlp.PRIVATE), None)
    redacting = tuple(n for n in detectors if found[n] and actions[n] == dlp.REDACT)
    if blocked is None and redacting:
        redactor = dlp.Redactor(redacting)
        decoded["messages"] = _rewrite(decoded.get("messages"), redactor)
        body = _encoder.encode(decoded)
    return Protected(body, dict(found), blocked, private)


def _texts(value: Any, key: str | None = None) -> Iterator[str]:
    if isinstance(value, str):
        if key not in _KEPT and not value.startswith("data:"):
            yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict) and value.get("type") != "input_audio":
        for name, item in value.items():
            yield from _texts(item, name)


def _rewrite(value: Any, redact: Callable[[str], str], key: str | None = None) -> Any:
    if isinstance(value, str):
        return value if key in _KEPT or value.startswith("data:") else redact(value)
    if isinstance(value, list):
        return [_rewrite(item, redact) for item in value]
    if isinstance(value, dict) and value.get("type") != "input_audio":
        return {name: _rewrite(item, redact, name) for name, item in value.items()}
    return value
