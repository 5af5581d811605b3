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
from shared.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ConsumerRequest,
    EmbeddingRequest,
    NotAPrompt,
    prompt_items,
)
from shared.protocol import CHAT, COMPLETION, EMBEDDING

# Sampling fields outside OpenAI's API that llama.cpp, vLLM and others read alike and that change
# only which tokens are drawn, never how many.
PASS_THROUGH = frozenset({"top_k", "min_p", "typical_p", "repetition_penalty", "repeat_penalty"})
FORWARDED = frozenset(ChatCompletionRequest.__struct_fields__) - {"provider", "metadata"} | PASS_THROUGH
# Per job kind. A completion's ``echo`` and ``suffix`` are refused (:func:`content_problem`); an
# embedding goes out as floats whatever the consumer asked: the coordinator encodes and cuts it.
FORWARDED_BY_KIND = {
    CHAT: FORWARDED,
    COMPLETION: frozenset(CompletionRequest.__struct_fields__) - {"provider", "metadata", "echo", "suffix"}
    | PASS_THROUGH,
    EMBEDDING: frozenset({"model", "input"}),
}


def kind_of(request: ConsumerRequest) -> str:
    """The job kind a consumer's request runs as."""
    if isinstance(request, EmbeddingRequest):
        return EMBEDDING
    return COMPLETION if isinstance(request, CompletionRequest) else CHAT


CONTENT_PARTS = frozenset({"text", "image_url", "input_audio", "refusal"})

_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


def backend_body(raw: bytes, completion_bound: int, kind: str = CHAT) -> bytes:
    """The body to send a backend for a job of ``kind``: the forwarded fields in the consumer's
    order, the output limit set to ``completion_bound`` (an embedding has none)."""
    body: dict[str, Any] = bodies.decode(_decoder, raw)
    forwarded = {key: value for key, value in body.items() if key in FORWARDED_BY_KIND[kind]}
    if kind == EMBEDDING:
        forwarded["encoding_format"] = "float"
        return _encoder.encode(forwarded)
    if "max_completion_tokens" in forwarded:
        forwarded["max_completion_tokens"] = completion_bound
    if "max_tokens" in forwarded or "max_completion_tokens" not in forwarded:
        forwarded["max_tokens"] = completion_bound
    return _encoder.encode(forwarded)


def content_problem(request: ConsumerRequest) -> tuple[str, str] | None:
    """``(param, message)`` for the first part of the request the pool does not forward (a content
    part, a completion's ``echo`` or ``suffix``, a malformed prompt or input), else ``None``."""
    if isinstance(request, CompletionRequest):
        if request.echo:
            return "echo", "`echo` is not supported: providers' servers differ in whether they can echo the prompt."
        if request.suffix is not None:
            return "suffix", "`suffix` (insertion) is not supported."
        problem = _prompt_problem(request.prompt, "prompt")
        if problem is None and len(prompt_items(request.prompt, "prompt")) > 1:
            return "prompt", "One prompt per request: send several prompts as several requests."
        return problem
    if isinstance(request, EmbeddingRequest):
        return _prompt_problem(request.input, "input")
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


def _prompt_problem(value: str | list[Any], name: str) -> tuple[str, str] | None:
    try:
        prompt_items(value, name)
    except NotAPrompt as exc:
        return exc.param, str(exc)
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


# Strings a backend does not read as text: the model's name and fixed vocabularies.
_NOT_TEXT = frozenset({"model", "role", "type", "tool_choice"})


def protect(body: bytes, actions: Mapping[str, str]) -> Protected:
    """Run the detectors ``actions`` names over every string of ``body`` a backend reads as text —
    messages, ``user``, tools' descriptions and schemas, ``response_format``, ``stop`` — and redact
    what the ``redact`` ones find (:class:`coordinator.core.dlp.Redactor`). Inline media (an image
    part's URL, an audio part's data) is not text and is left alone. A match split across a
    message's content parts cannot be redacted part by part: it is blocked instead."""
    decoded: dict[str, Any] = _decoder.decode(body)
    detectors = tuple(name for name in dlp.DETECTORS if name in actions)
    found: Counter[str] = Counter()
    for text in _texts(decoded):
        found += dlp.find(text, detectors)
    split = _split_matches(decoded.get("messages"), detectors, found)
    blocked = next((n for n in detectors if found[n] and actions[n] == dlp.BLOCK), None)
    blocked = blocked or next((n for n in split if actions[n] == dlp.REDACT), None)
    private = next((n for n in detectors if (found[n] or n in split) and actions[n] == dlp.PRIVATE), None)
    redacting = tuple(n for n in detectors if found[n] and actions[n] == dlp.REDACT)
    if blocked is None and redacting:
        redactor = dlp.Redactor(redacting)
        decoded = _rewrite(decoded, redactor)
        body = _encoder.encode(decoded)
    for name in split:
        found[name] = max(found[name], 1)
    return Protected(body, dict(found), blocked, private)


def _media(value: dict[str, Any], name: str) -> bool:
    """Whether ``value[name]`` is inline media rather than text."""
    kind = value.get("type")
    return (kind == "image_url" and name == "image_url") or (kind == "input_audio" and name == "input_audio")


def _texts(value: Any, key: str | None = None) -> Iterator[str]:
    if isinstance(value, str):
        if key not in _NOT_TEXT:
            yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for name, item in value.items():
            if not _media(value, name):
                yield from _texts(item, name)


def _rewrite(value: Any, redact: Callable[[str], str], key: str | None = None) -> Any:
    if isinstance(value, str):
        return value if key in _NOT_TEXT else redact(value)
    if isinstance(value, list):
        return [_rewrite(item, redact) for item in value]
    if isinstance(value, dict):
        return {name: item if _media(value, name) else _rewrite(item, redact, name) for name, item in value.items()}
    return value


def _split_matches(messages: Any, detectors: tuple[str, ...], found: Counter[str]) -> set[str]:
    """The detectors that find more in a message's text parts joined (as a backend's template joins
    them) than the parts held one by one: a match split across parts."""
    split: set[str] = set()
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        parts = [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
        if len(parts) < 2:
            continue
        alone = Counter[str]()
        for part in parts:
            alone += dlp.find(part, detectors)
        joined = dlp.find("".join(parts), detectors)
        split |= {name for name in detectors if joined[name] > alone[name]}
    return split
