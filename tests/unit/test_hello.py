"""An agent's hello: what is refused and why, price ceilings, and the quantization each offer is served as."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.market import catalog
from coordinator.market.offers import HelloRefused, hello_offers
from coordinator.money.metering import Price
from shared import protocol
from shared.protocol import Hello, ModelOffer


def _hello(**kw: object) -> Hello:
    fields: dict[str, object] = {
        "protocol": protocol.PROTOCOL_VERSION,
        "agent_version": "t",
        "models": [ModelOffer("smollm2-135m", "m", 1, 2)],
        "max_concurrency": 2,
    }
    fields.update(kw)
    return Hello(**fields)  # type: ignore[arg-type]


DIRECTORY = catalog.Directory(catalog.shipped())


CEILING = Price(50_000, 200_000)


def hello_refusal(hello: Hello) -> str:
    with pytest.raises(HelloRefused) as refused:
        hello_offers(hello, DIRECTORY, CEILING)
    return str(refused.value)


def test_hello_validation_gives_reasons() -> None:
    assert list(hello_offers(_hello(), DIRECTORY, CEILING)) == ["smollm2-135m"]
    assert "protocol version 99" in hello_refusal(_hello(protocol=99))
    assert "no models" in hello_refusal(_hello(models=[]))
    assert "max_concurrency" in hello_refusal(_hello(max_concurrency=0))
    assert "slug" in hello_refusal(_hello(models=[ModelOffer("Bad Slug", "m", 1, 1)]))
    twice = [ModelOffer("smollm2-135m", "a", 1, 1), ModelOffer("", "SmolLM2-135M-Instruct.Q4_1.gguf", 1, 1)]
    assert "'smollm2-135m' announced twice" in hello_refusal(_hello(models=twice))
    assert "negative" in hello_refusal(_hello(models=[ModelOffer("smollm2-135m", "a", -1, 1)]))
    unknown = hello_refusal(_hello(models=[ModelOffer("", "my-finetune-3b.gguf", 1, 1)]))
    assert "'my-finetune-3b.gguf' is not in the pool's directory" in unknown and "smollm2-135m" in unknown


def test_prices_above_the_ceiling_are_refused_at_hello() -> None:
    for price_in, price_out in ((50_001, 1), (1, 200_001), (2**62, 2**62)):
        hello = _hello()
        offer = msgspec.structs.replace(hello.models[0], price_in=price_in, price_out=price_out)
        with pytest.raises(HelloRefused, match="ceiling"):
            hello_offers(msgspec.structs.replace(hello, models=[offer]), DIRECTORY, CEILING)
    entry = msgspec.structs.replace(DIRECTORY.entries["smollm2-135m"], max_price_in=7, max_price_out=8)
    assert entry.ceiling(CEILING) == Price(7, 8)
    with pytest.raises(catalog.DirectoryError):
        catalog.check(msgspec.structs.replace(entry, max_price_out=catalog.MAX_PRICE + 1))


def test_quantization_is_read_from_the_backend_name_or_announced() -> None:
    hello = Hello(
        protocol=protocol.PROTOCOL_VERSION,
        agent_version="t",
        max_concurrency=1,
        models=[
            ModelOffer("", "SmolLM2-135M-Instruct-Q4_K_M.gguf", 1, 1),
            ModelOffer("gemma-3-270m", "gemma", 1, 1, quantization="Q8_0"),
            ModelOffer("qwen2.5-coder-7b", "qwen", 1, 1),
        ],
    )
    offers = hello_offers(hello, DIRECTORY, CEILING)
    assert {slug: offer.quantization for slug, offer in offers.items()} == {
        "smollm2-135m": "q4_k_m",
        "gemma-3-270m": "q8_0",
        "qwen2.5-coder-7b": "",
    }
    # a label the directory does not list for the model is refused: no one would share its canaries
    for offer in (
        ModelOffer("", "SmolLM2-135M-Instruct-Q3_K_S.gguf", 1, 1),
        ModelOffer("gemma-3-270m", "g", 1, 1, quantization="mine"),
    ):
        with pytest.raises(HelloRefused, match="is not one the directory lists"):
            hello_offers(msgspec.structs.replace(hello, models=[offer]), DIRECTORY, CEILING)
