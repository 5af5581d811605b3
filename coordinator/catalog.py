"""Facts about well-known models, shown in the directory (``GET /v1/models``).

A model that is neither here, announced by an agent, nor mapped to the upstream is unknown (404).
"""

from __future__ import annotations

import msgspec


class ModelInfo(msgspec.Struct, frozen=True):
    display_name: str
    family: str
    parameter_count: int | None
    context_window: int | None
    use_cases: tuple[str, ...] = ()


CATALOG: dict[str, ModelInfo] = {
    "smollm2-135m": ModelInfo("SmolLM2 135M Instruct", "smollm2", 135_000_000, 8192, ("chat",)),
    "gemma-3-270m": ModelInfo("Gemma 3 270M", "gemma-3", 270_000_000, 32768, ("completion",)),
}


def info(slug: str) -> ModelInfo:
    """Catalog facts, or a plain entry named after the slug."""
    return CATALOG.get(slug) or ModelInfo(slug, slug.split("-")[0], None, None)
