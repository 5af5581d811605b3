"""The model directory: canonical slugs, their facts, and the aliases that map backend names to them.

Shipped as data (``catalog.toml``) and edited with ``pool-coordinator admin models …``, which writes
entries to the ``directory_models`` table; a database entry replaces the shipped one of its slug,
and a removed one hides it. Every process reloads the directory periodically.

A backend's model name maps to a slug when, normalised, it equals the slug or one of its aliases:
``qwen2.5-coder:7b``, ``Qwen/Qwen2.5-Coder-7B-Instruct`` and ``qwen2.5-coder-7b-instruct-q4_k_m.gguf``
all name ``qwen2.5-coder-7b``; the quantisation suffix, if any, is kept apart.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any, cast

import msgspec
from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from coordinator.core.models import DirectoryModel
from coordinator.money.metering import Price

SLUG = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,63}$")
_QUANT = re.compile(r"[-.](i?q\d+(?:-[a-z0-9]+)*|f16|bf16|f32|fp16|fp8|int4|int8|awq|gptq|mlx|\d+-?bit)$")
_table = cast(Table, DirectoryModel.__table__)
# The highest price ceiling an entry may set: $1,000 per 1M tokens, in nano-USD per token. With it,
# the largest hold (a 4 MiB prompt and a million-token output) stays far inside a BIGINT.
MAX_PRICE = 1_000_000


_INT8 = re.compile(r"i?q8(_[a-z0-9]+)*|int8|8_?bit")
_INT4 = re.compile(r"i?q4(_[a-z0-9]+)*|int4|4_?bit|awq|gptq")


_SYNONYMS = {"fp16": "f16", "fp32": "f32"}


def quantization_label(raw: str) -> str:
    """A quantisation as the pool writes it: ``Q4_K_M`` and ``q4-k-m`` are ``q4_k_m``, ``fp16`` is ``f16``."""
    label = raw.strip().lower().replace("-", "_")
    return _SYNONYMS.get(label, label)


def precision(label: str) -> str | None:
    """OpenRouter's precision class of a quantisation label (``q4_k_m`` and ``awq`` are ``int4``,
    ``q8_0`` is ``int8``, ``f16`` is ``fp16``), so routing preferences in either vocabulary match."""
    label = quantization_label(label)
    if label in ("f32", "fp32"):
        return "fp32"
    if label in ("f16", "fp16"):
        return "fp16"
    if label in ("bf16", "fp8", "fp6", "fp4"):
        return label
    if _INT8.fullmatch(label):
        return "int8"
    if _INT4.fullmatch(label):
        return "int4"
    return None


EMBEDDING_USE = "embedding"  # the use case of an embedding model


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    slug: str
    display_name: str
    family: str
    parameter_count: int | None = None
    context_window: int | None = None
    use_cases: tuple[str, ...] = ()
    quantizations: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    max_price_in: int | None = None  # nano-USD per token an agent may ask at most (None: the default)
    max_price_out: int | None = None
    dimensions: int | None = None  # an embedding model's vector size
    matryoshka: bool = False  # its vectors keep their meaning cut short: requests may ask fewer ``dimensions``

    @property
    def embeds(self) -> bool:
        """An embedding model: served at ``/v1/embeddings``, not for chat or completions."""
        return EMBEDDING_USE in self.use_cases

    def ceiling(self, default: Price) -> Price:
        """The highest prices agents may announce for this model."""
        return Price(
            default.input if self.max_price_in is None else self.max_price_in,
            default.output if self.max_price_out is None else self.max_price_out,
        )


class DirectoryError(ValueError):
    """An entry that cannot go into the directory."""


def normalize(name: str) -> tuple[str, str | None]:
    """``(base name, quantisation)`` of a model name, for alias matching."""
    text = name.strip().lower().replace("\\", "/").rsplit("/", 1)[-1]
    text = text.removesuffix(".gguf").replace(":", "-").replace("_", "-")
    quant = None
    while (match := _QUANT.search(text)) is not None and match.start() > 0:
        quant = quant or match.group(1).replace("-", "_")
        text = text[: match.start()]
    return text, quant


def check(info: ModelInfo) -> ModelInfo:
    """``info`` if it is a valid entry, else :class:`DirectoryError` saying why."""
    if not SLUG.match(info.slug):
        raise DirectoryError(f"invalid slug {info.slug!r} (lowercase letters, digits, . _ : -, at most 64)")
    if not info.display_name.strip() or not info.family.strip():
        raise DirectoryError(f"{info.slug}: display name and family are required")
    for name, value in (
        ("parameter count", info.parameter_count),
        ("context window", info.context_window),
        ("dimensions", info.dimensions),
    ):
        if value is not None and value <= 0:
            raise DirectoryError(f"{info.slug}: {name} must be positive")
    for name, value in (("max price in", info.max_price_in), ("max price out", info.max_price_out)):
        if value is not None and not 0 <= value <= MAX_PRICE:
            raise DirectoryError(f"{info.slug}: {name} must be between 0 and {MAX_PRICE} nano-USD per token")
    if any(not alias.strip() or len(alias) > 200 for alias in info.aliases):
        raise DirectoryError(f"{info.slug}: aliases must be 1-200 characters")
    labels = tuple(dict.fromkeys(quantization_label(q) for q in info.quantizations if q.strip()))
    return info if labels == info.quantizations else msgspec.structs.replace(info, quantizations=labels)


class Directory:
    """The directory as one process sees it: entries by slug, and normalised names to slugs."""

    def __init__(self, entries: Sequence[ModelInfo]) -> None:
        self.entries = {info.slug: info for info in entries}
        self._names: dict[str, str] = {}
        for info in entries:
            for name in (info.slug, *info.aliases):
                self._names.setdefault(normalize(name)[0], info.slug)

    def get(self, slug: str) -> ModelInfo | None:
        return self.entries.get(slug)

    def resolve(self, name: str) -> tuple[str, str | None] | None:
        """``(slug, quantisation)`` for a slug, alias or backend model name, ``None`` if unknown."""
        if name in self.entries:
            return name, None
        base, quant = normalize(name)
        slug = self._names.get(base)
        return None if slug is None else (slug, quant)

    def check_names(self, info: ModelInfo) -> None:
        """:class:`DirectoryError` if the slug or an alias of ``info`` already names another model."""
        for name in (info.slug, *info.aliases):
            owner = self.resolve(name)
            if owner is not None and owner[0] != info.slug:
                raise DirectoryError(f"{name!r} already names {owner[0]!r}")

    def unknown(self, name: str) -> str:
        """Why ``name`` is refused, for the agent to print."""
        return (
            f"model {name!r} is not in the pool's directory (known: {', '.join(sorted(self.entries))}); "
            "announce one of those slugs as SLUG=BACKEND_MODEL, or ask the operator to add it "
            "(pool-coordinator admin models add)"
        )


@functools.cache
def shipped() -> tuple[ModelInfo, ...]:
    """The entries in ``catalog.toml`` (read once per process)."""
    data = tomllib.loads(resources.files("coordinator.market").joinpath("catalog.toml").read_text("utf-8"))
    return tuple(check(msgspec.convert({"slug": slug, **fields}, ModelInfo)) for slug, fields in data.items())


def merge(base: Sequence[ModelInfo], rows: Sequence[Any]) -> Directory:
    """The shipped entries with the database's edits over them."""
    entries = {info.slug: info for info in base}
    for row in rows:
        if row.removed:
            entries.pop(row.slug, None)
        else:
            entries[row.slug] = check(msgspec.json.decode(row.entry, type=ModelInfo))
    return Directory(sorted(entries.values(), key=lambda info: info.slug))


async def load(engine: AsyncEngine) -> Directory:
    async with engine.connect() as conn:
        return await load_from(conn)


async def load_from(conn: AsyncConnection) -> Directory:
    rows = (await conn.execute(select(_table))).all()
    return merge(shipped(), rows)


async def save(conn: AsyncConnection, info: ModelInfo) -> None:
    """Add or replace an entry (an admin edit)."""
    await _write(conn, info.slug, msgspec.json.encode(check(info)).decode(), removed=False)


async def remove(conn: AsyncConnection, slug: str) -> None:
    await _write(conn, slug, "{}", removed=True)


async def _write(conn: AsyncConnection, slug: str, entry: str, *, removed: bool) -> None:
    values = {"entry": entry, "removed": removed, "updated_at": datetime.now(UTC)}
    updated = await conn.execute(_table.update().where(_table.c.slug == slug).values(**values))
    if updated.rowcount == 0:
        await conn.execute(_table.insert().values(slug=slug, **values))
