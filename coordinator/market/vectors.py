"""Embedding vectors as the pool handles them, pure: read out of a backend's reply and checked (one
per input, all of one size, finite), cut short for a matryoshka model, encoded for the consumer
(floats, or base64 of little-endian float32 as OpenAI sends them), compared by cosine similarity,
and kept as text (a canary's answer and reference, ``trust/references.py``)."""

from __future__ import annotations

import base64
import math
import struct

import msgspec

from coordinator.market.catalog import ModelInfo

# An embedding answer kept as text begins so; what follows is its float32 vector in base64.
TEXT_PREFIX = "embedding:"
# The reply bytes an embedding job may send per number (up to 24 characters and a comma), and per
# input when the directory does not say the model's size (as if 16,384 numbers).
BYTES_PER_NUMBER = 26
BYTES_PER_INPUT = 16_384 * BYTES_PER_NUMBER
FLOAT32_MAX = 3.4028234663852886e38


def reply_budget(inputs: int, size: int | None) -> int:
    """The most bytes an embedding reply for ``inputs`` inputs may take, beyond its envelope."""
    return inputs * (size * BYTES_PER_NUMBER + 64 if size else BYTES_PER_INPUT)


class _Vector(msgspec.Struct):
    embedding: list[float]
    index: int = -1


class _Reply(msgspec.Struct):
    data: list[_Vector]


_reply = msgspec.json.Decoder(_Reply)


def vectors(body: bytes, inputs: int, size: int | None) -> list[list[float]] | str:
    """The reply's vectors in input order, or why they are unusable: not one per input, of mixed
    or unexpected size (``size``: the directory's), or not finite."""
    try:
        reply = _reply.decode(body)
    except msgspec.DecodeError as exc:
        return f"not an embedding list ({exc})"
    if len(reply.data) != inputs:
        return f"{len(reply.data)} vectors for {inputs} inputs"
    order = sorted(range(inputs), key=lambda i: reply.data[i].index if reply.data[i].index >= 0 else i)
    found = [reply.data[i].embedding for i in order]
    sizes = {len(vector) for vector in found}
    if len(sizes) != 1 or 0 in sizes:
        return "vectors of different or zero sizes"
    if size is not None and sizes != {size}:
        return f"vectors of {sizes.pop()} dimensions, the model's are {size}"
    if not all(all(map(math.isfinite, vector)) and max(map(abs, vector)) <= FLOAT32_MAX for vector in found):
        return "vectors hold numbers that are not finite float32 values"
    return found


def shortened(vector: list[float], dimensions: int) -> list[float]:
    """The first ``dimensions`` of a matryoshka vector, scaled back to unit length."""
    cut = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in cut))
    return [x / norm for x in cut] if norm > 0 else cut


def packed(vector: list[float]) -> str:
    """Base64 of the vector as little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def encoded(vector: list[float], encoding: str) -> list[float] | str:
    return packed(vector) if encoding == "base64" else vector


def dimensions_problem(info: ModelInfo | None, slug: str, dimensions: int) -> str | None:
    """Why ``dimensions`` cannot be honoured for ``slug``, or ``None``."""
    if info is None or not info.matryoshka:
        return (
            f"`{slug}` does not support `dimensions`: its vectors lose their meaning cut short. Leave `dimensions` "
            "out to get the model's full size."
        )
    if info.dimensions is not None and dimensions > info.dimensions:
        return f"`dimensions` must be at most {info.dimensions} for `{slug}`."
    return None


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity (0 for vectors of different sizes or of zero length)."""
    if len(a) != len(b):
        return 0.0
    norms = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / norms if norms > 0 else 0.0


def as_text(vector: list[float]) -> str:
    """A vector kept as text (a canary's answer)."""
    return TEXT_PREFIX + packed(vector)


def from_text(text: str) -> list[float] | None:
    """The vector :func:`as_text` kept, or ``None`` for text that is not one."""
    if not text.startswith(TEXT_PREFIX):
        return None
    try:
        raw = base64.b64decode(text[len(TEXT_PREFIX) :], validate=True)
    except ValueError:
        return None
    if not raw or len(raw) % 4:
        return None
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
