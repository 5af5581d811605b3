"""What verification jobs (canaries) ask, and in what shape.

Prompts: a shipped pool of short questions, generated from templates (public, so an agent could
recognise them), plus the operator's own (``POOL_CANARY_PROMPTS_FILE``, one per line), which no agent
can know: when there are some, half the canaries ask one of those.

Shapes: a canary's body copies the shape of a recent consumer request — stream or not,
``stream_options``, which optional keys appear and in what order, their JSON types, the seed and token
limit values, compact or spaced JSON — from a bounded reservoir that :meth:`Shapes.observe` fills with
one in ``every`` admitted requests (never their prompts). Two things stay fixed because the answer is
compared with a reference: ``temperature`` is always 0 (inserted when the consumer sent none), and
the answer is judged on at most ``cap`` tokens (a non-stream limit above it is lowered to it; a
stream with a higher or no limit keeps it and is cut after ``cap`` tokens).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from coordinator.core.settings import SettingsError

CAP = 64  # the most tokens a canary's answer is judged on (and costs the provider, when not streamed)
EVERY = 16  # consumer requests per one whose shape is read
RESERVOIR = 256  # consumer shapes kept
OPERATOR_SHARE = 0.5  # canaries that ask one of the operator's prompts, when there are some


# --- prompts ------------------------------------------------------------------------------------

_COUNTRIES = (
    "France Japan Italy Spain Germany Canada Brazil Egypt Kenya Peru Norway Greece Mexico India China Chile "
    "Sweden Portugal Australia Argentina Poland Turkey Ireland Thailand Vietnam Morocco Austria Cuba Finland "
    "Denmark"
)
_WORDS = "hot tall fast happy early light open full strong old rich loud wet hard young dark big clean soft sweet"
_ANIMALS = "cow cat dog horse sheep duck lion owl frog bee whale snake pig goat wolf bear mouse eagle shark rabbit"
_THINGS = (
    "the sky",
    "grass",
    "a banana",
    "snow",
    "a tomato",
    "coal",
    "an orange",
    "the sea",
    "a lemon",
    "milk",
    "a carrot",
    "chocolate",
    "a cloud",
    "an emerald",
    "a flamingo",
)
_PHRASES = ("hello", "thank you", "goodbye", "cat", "water", "friend", "house", "bread", "good morning", "yes")
_LANGUAGES = ("Spanish", "French", "German", "Italian", "Portuguese")
_TOPICS = (
    "the moon",
    "rain",
    "coffee",
    "the ocean",
    "trees",
    "music",
    "winter",
    "a library",
    "bicycles",
    "volcanoes",
    "bread",
    "the internet",
    "honey",
    "mountains",
    "friendship",
    "the sun",
    "clocks",
    "rivers",
    "books",
    "gardens",
)
_KINDS = (
    "fruit",
    "vegetable",
    "planet",
    "colour",
    "musical instrument",
    "sport",
    "metal",
    "flower",
    "bird",
    "tree",
    "insect",
    "gemstone",
    "spice",
    "board game",
    "vehicle",
    "programming language",
    "dog breed",
    "cheese",
    "dance",
    "fabric",
)
_SPELLED = "apple river garden pencil window rocket silver basket candle dragon jacket lemon marble planet tiger"
_FACTS = (
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a planet in our solar system.",
    "What is the opposite of hot?",
    "How many days are in a week?",
    "What animal says moo?",
    "Give me a synonym for happy.",
    "What is water made of?",
    "Name a fruit that is yellow.",
    "How many hours are in a day?",
    "How many minutes are in an hour?",
    "How many months are in a year?",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What gas do plants breathe in?",
    "What is the freezing point of water in Fahrenheit?",
    "What is the tallest mountain in the world?",
    "What is the chemical symbol for gold?",
    "How many sides does a hexagon have?",
    "What is the square root of 81?",
)


def shipped() -> tuple[str, ...]:
    """The shipped prompts: short questions with short answers, from templates (several hundred)."""
    prompts: list[str] = list(_FACTS)
    for country in _COUNTRIES.split():
        prompts += [
            f"What is the capital of {country}?",
            f"What language is spoken in {country}?",
            f"Name a famous food from {country}.",
            f"On which continent is {country}?",
        ]
    for word in _WORDS.split():
        prompts += [
            f"What is the opposite of {word}?",
            f"Give me a synonym for {word}.",
            f"Use the word '{word}' in a sentence.",
        ]
    prompts += [f"What is {a} + {b}?" for a in (3, 7, 12, 25, 48) for b in (4, 9, 16, 31, 55, 86)]
    prompts += [f"What is {a} times {b}?" for a in (2, 3, 6, 11) for b in (4, 7, 8, 12, 15)]
    for animal in _ANIMALS.split():
        prompts += [
            f"What sound does a {animal} make?",
            f"Where does a {animal} live?",
            f"What does a {animal} eat?",
            f"Describe a {animal} in one sentence.",
        ]
    prompts += [f"What colour is {thing}?" for thing in _THINGS]
    prompts += [f"How do you say '{phrase}' in {language}?" for phrase in _PHRASES for language in _LANGUAGES]
    for topic in _TOPICS:
        prompts += [
            f"Write one sentence about {topic}.",
            f"Tell me a fun fact about {topic}.",
            f"Explain {topic} to a child in one sentence.",
            f"Write a haiku about {topic}.",
        ]
    for kind in _KINDS:
        prompts += [f"Name a {kind}.", f"Name three kinds of {kind}.", f"What is your favourite {kind} and why?"]
    for word in _SPELLED.split():
        prompts += [f"Spell the word '{word}' backwards.", f"How many letters are in the word '{word}'?"]
    return tuple(dict.fromkeys(prompts))


def read_prompts(path: str | None) -> tuple[str, ...]:
    """The operator's prompts: the file's non-empty lines that are not ``#`` comments."""
    if not path:
        return ()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"POOL_CANARY_PROMPTS_FILE: {exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return tuple(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


@dataclass(frozen=True)
class Prompts:
    """The pool canaries draw from: the shipped prompts and the operator's."""

    shipped: tuple[str, ...] = field(default_factory=shipped)
    operator: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.shipped) + len(self.operator)

    def draw(self, rng: random.Random) -> str:
        if self.operator and rng.random() < OPERATOR_SHARE:
            return rng.choice(self.operator)
        return rng.choice(self.shipped)


def digest(slug: str, prompt: str) -> str:
    """How references name a prompt for a model: never the prompt itself."""
    return hashlib.sha256(f"{slug}\n{prompt}".encode()).hexdigest()


# --- shapes -------------------------------------------------------------------------------------

# Optional keys a canary copies from a consumer's request; any other key is left out (its value could
# change the answer or identify the consumer).
COPIED = frozenset(
    {
        "frequency_penalty",
        "max_completion_tokens",
        "max_tokens",
        "n",
        "presence_penalty",
        "seed",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
    }
)
LIMITS = ("max_tokens", "max_completion_tokens")
ZEROED = frozenset({"temperature", "frequency_penalty", "presence_penalty"})  # kept at 0: greedy, unpenalised


class Shape(NamedTuple):
    """A consumer request without its content: its keys in order with the values a canary copies
    (``None`` for ``messages`` and ``model``), and whether its JSON was spaced."""

    fields: tuple[tuple[str, Any], ...]
    spaced: bool


# Before any consumer request was seen: bodies as the OpenAI SDKs commonly send them.
DEFAULT_SHAPES = (
    Shape((("messages", None), ("model", None), ("max_tokens", 32), ("stream", True), ("temperature", 0)), False),
    Shape((("messages", None), ("model", None), ("max_tokens", 48), ("temperature", 0)), False),
    Shape(
        (
            ("messages", None),
            ("model", None),
            ("max_tokens", 64),
            ("stream", True),
            ("stream_options", {"include_usage": True}),
            ("temperature", 0.0),
        ),
        True,
    ),
)

_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])


def shape_of(raw: bytes) -> Shape | None:
    """The shape of a consumer's request body (already validated), or ``None`` if unreadable."""
    try:
        body = _fields.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    kept: list[tuple[str, Any]] = []
    for key, value in body.items():
        if key in ("messages", "model"):
            kept.append((key, None))
        elif key in COPIED:
            try:
                decoded = _copyable(key, msgspec.json.decode(value))
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
            if decoded is not None:
                kept.append((key, decoded))
    head = bytes(raw[:200])
    return Shape(tuple(kept), b'": ' in head or b", " in head)


def _copyable(key: str, value: Any) -> Any:
    """The value a canary may send for ``key`` given the consumer's, or ``None`` to leave it out."""
    if key == "stream":
        return value if isinstance(value, bool) else None
    if key == "stream_options":
        usage = value.get("include_usage") if isinstance(value, dict) else None
        return {"include_usage": usage} if isinstance(usage, bool) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if key in ZEROED:
        return 0 if isinstance(value, int) else 0.0  # zero, in the JSON type the consumer used
    return value


@dataclass
class Shapes:
    """A bounded, uniform sample (reservoir) of the shapes of recent consumer requests."""

    every: int = EVERY
    size: int = RESERVOIR
    kept: list[Shape] = field(default_factory=list)
    seen: int = 0  # shapes read
    countdown: int = 1  # requests until the next one is read
    rng: random.Random = field(default_factory=random.Random)

    def observe(self, raw: bytes) -> None:
        """Count an admitted consumer request; read the shape of one in ``every``."""
        self.countdown -= 1
        if self.countdown > 0:
            return
        self.countdown = self.every
        shape = shape_of(raw)
        if shape is None:
            return
        self.seen += 1
        if len(self.kept) < self.size:
            self.kept.append(shape)
            return
        slot = self.rng.randrange(self.seen)
        if slot < self.size:
            self.kept[slot] = shape

    def draw(self, rng: random.Random) -> Shape:
        return rng.choice(self.kept or DEFAULT_SHAPES)


# --- canary bodies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    """One verification request: its body, how it runs, and how many tokens its answer is judged on
    (``cut``: stop reading a stream there, the request's own limit being higher)."""

    body: bytes
    stream: bool
    want_usage: bool
    limit: int
    cut: bool


def build(shape: Shape, slug: str, prompt: str, cap: int = CAP) -> Canary:
    """A canary asking ``prompt`` of ``slug`` in ``shape``."""
    body: dict[str, Any] = {}
    for key, value in shape.fields:
        body[key] = value
    body["messages"] = [{"role": "user", "content": prompt}]
    body["model"] = slug
    stream = body.get("stream") is True
    if "temperature" not in body:
        _insert(body, "temperature", 0)
    limit_key = next((key for key in LIMITS if key in body), None)
    requested = body[limit_key] if limit_key is not None else None
    limit = cap if requested is None else max(1, min(int(requested), cap))
    cut = stream and (requested is None or requested > cap)
    if not stream and requested != limit:
        if limit_key is None:
            _insert(body, "max_tokens", limit)
        else:
            body[limit_key] = limit
    options = body.get("stream_options")
    want_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    separators = (", ", ": ") if shape.spaced else (",", ":")
    raw = json.dumps(body, separators=separators, ensure_ascii=False).encode()
    return Canary(raw, stream, want_usage, limit, cut)


def _insert(body: dict[str, Any], key: str, value: Any) -> None:
    """Add ``key`` where a client would put it: in order if the optional keys are sorted, else last."""
    keys = list(body)
    optional = [k for k in keys if k not in ("messages", "model")]
    if optional == sorted(optional):
        keys.insert(next((i for i, k in enumerate(keys) if k in optional and k > key), len(keys)), key)
    else:
        keys.append(key)
    items = {**body, key: value}
    body.clear()
    body.update((k, items[k]) for k in keys)


def reference_body(slug: str, prompt: str, cap: int = CAP) -> bytes:
    """The request that asks a trusted source (the platform upstream) for a reference answer."""
    messages = [{"role": "user", "content": prompt}]
    return msgspec.json.encode({"messages": messages, "model": slug, "max_tokens": cap, "temperature": 0})


def completion(slug: str, prompt: str, cap: int = CAP, stream: bool = False) -> Canary:
    """A canary asking a text completion of ``prompt`` (greedy, ``cap`` tokens), streamed or not,
    as a consumer's ``/v1/completions`` request; its body is also what asks a trusted source."""
    body: dict[str, Any] = {"model": slug, "prompt": prompt, "max_tokens": cap, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return Canary(msgspec.json.encode(body), stream, stream, cap, False)
