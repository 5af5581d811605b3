"""The model directory: backend names mapped to slugs, operator edits over the shipped catalog, precision classes."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.market import catalog
from coordinator.market.catalog import precision

DIRECTORY = catalog.Directory(catalog.shipped())


def test_backend_names_map_to_directory_slugs() -> None:
    """The spellings of llama.cpp files, Hugging Face ids, Ollama tags and vLLM/LM Studio names."""
    cases = {
        "qwen2.5-coder:7b": ("qwen2.5-coder-7b", None),
        "Qwen/Qwen2.5-Coder-7B-Instruct": ("qwen2.5-coder-7b", None),
        "qwen2.5-coder-7b-instruct-q4_k_m.gguf": ("qwen2.5-coder-7b", "q4_k_m"),
        "/models/Qwen2.5-Coder-7B-Instruct-Q5_K_M.gguf": ("qwen2.5-coder-7b", "q5_k_m"),
        "SmolLM2-135M-Instruct.Q4_1.gguf": ("smollm2-135m", "q4_1"),
        "smollm2-135m": ("smollm2-135m", None),
        "HuggingFaceTB/SmolLM2-135M-Instruct": ("smollm2-135m", None),
        "gemma3:270m": ("gemma-3-270m", None),
        "gemma-3-270m-it-Q8_0.gguf": ("gemma-3-270m-it", "q8_0"),
        "meta-llama/Llama-3.1-8B-Instruct-AWQ": ("llama-3.1-8b", "awq"),
    }
    assert {name: DIRECTORY.resolve(name) for name in cases} == cases
    for unknown in ("qwen2.5-coder:14b", "gemma-3-27b", "smollm2-360m", "", "q4_k_m"):
        assert DIRECTORY.resolve(unknown) is None, unknown


def test_directory_edits_replace_add_and_hide_shipped_entries() -> None:
    class Row:
        def __init__(self, slug: str, info: catalog.ModelInfo | None) -> None:
            self.slug, self.removed = slug, info is None
            self.entry = msgspec.json.encode(info) if info else b"{}"

    tiny = catalog.ModelInfo(slug="tiny-1m", display_name="Tiny", family="tiny", aliases=("org/Tiny-1M",))
    renamed = msgspec.structs.replace(DIRECTORY.entries["mistral-7b"], display_name="Mistral 7B v0.3")
    merged = catalog.merge(
        catalog.shipped(), [Row("tiny-1m", tiny), Row("mistral-7b", renamed), Row("gemma-3-270m", None)]
    )
    assert merged.resolve("tiny-1m.Q8_0.gguf") == ("tiny-1m", "q8_0")
    assert merged.entries["mistral-7b"].display_name == "Mistral 7B v0.3"
    assert merged.get("gemma-3-270m") is None and merged.resolve("gemma3:270m") is None
    with pytest.raises(catalog.DirectoryError, match="invalid slug"):
        catalog.check(msgspec.structs.replace(tiny, slug="Tiny Model"))


def test_precision_classes_of_quantization_labels() -> None:
    classes = {label: precision(label) for label in ("q4_k_m", "IQ4_XS", "q4_1", "awq", "gptq", "4bit", "Q8_0")}
    assert classes == {
        "q4_k_m": "int4",
        "IQ4_XS": "int4",
        "q4_1": "int4",
        "awq": "int4",
        "gptq": "int4",
        "4bit": "int4",
        "Q8_0": "int8",
    }
    assert [precision(label) for label in ("f16", "fp16", "bf16", "f32", "fp8")] == [
        "fp16",
        "fp16",
        "bf16",
        "fp32",
        "fp8",
    ]
    assert [precision(label) for label in ("q5_k_m", "q6_k", "q3_k_s", "unknown", "mlx")] == [None] * 5
