"""An agent's hello, judged: which of its offers the pool accepts, by directory slug. What an
agent announces binds only its own jobs, and its prices stay within the directory's ceilings."""

from __future__ import annotations

import msgspec

from coordinator.market.catalog import SLUG, Directory, normalize, quantization_label
from coordinator.money.metering import Price
from shared import protocol
from shared.money import NANO_PER_USD, TOKENS_PER_PRICE_UNIT
from shared.protocol import (
    Hello,
    ModelOffer,
)

MAX_CONCURRENCY = 1024
MAX_QUANTIZATION = 32  # characters of a quantization label (as a request's `provider.quantizations` allows)


def _usd_per_million(nano_per_token: int) -> str:
    return f"${nano_per_token * TOKENS_PER_PRICE_UNIT / NANO_PER_USD:g}"


class HelloRefused(Exception):
    """Why a Hello cannot be accepted (sent to the agent, which prints it)."""


def hello_offers(hello: Hello, directory: Directory, default_ceiling: Price) -> dict[str, ModelOffer]:
    """The agent's offers by directory slug; :class:`HelloRefused` if the Hello cannot be accepted.

    An offer names its slug, or leaves it empty for the coordinator to find from the backend model
    name through the directory's aliases; either way the model must be in the directory, and its
    prices within the entry's ceiling (``default_ceiling`` where the entry sets none): what one
    agent asks must not raise what every consumer's request holds without bound."""
    if hello.protocol not in protocol.SUPPORTED_VERSIONS:
        versions = ", ".join(str(v) for v in sorted(protocol.SUPPORTED_VERSIONS))
        raise HelloRefused(
            f"protocol version {hello.protocol} is not supported; this coordinator speaks versions {versions}: "
            "upgrade pool-agent"
        )
    if not hello.models:
        raise HelloRefused("hello announces no models")
    if not 1 <= hello.max_concurrency <= MAX_CONCURRENCY:
        raise HelloRefused(f"max_concurrency must be between 1 and {MAX_CONCURRENCY}")
    offers: dict[str, ModelOffer] = {}
    for offer in hello.models:
        name = offer.slug or offer.backend_model
        if not offer.backend_model or len(offer.backend_model) > 200:
            raise HelloRefused(f"model {name!r}: backend_model must be 1-200 characters")
        if offer.slug and not SLUG.match(offer.slug):
            raise HelloRefused(f"invalid model slug {offer.slug!r} (lowercase letters, digits, . _ : -)")
        found = directory.resolve(name)
        if found is None:
            raise HelloRefused(directory.unknown(name))
        slug = found[0]
        if slug in offers:
            raise HelloRefused(f"model {slug!r} announced twice")
        if offer.price_in < 0 or offer.price_out < 0:
            raise HelloRefused(f"model {slug!r}: prices must not be negative")
        ceiling = directory.entries[slug].ceiling(default_ceiling)
        if not ceiling.covers(Price(offer.price_in, offer.price_out)):
            raise HelloRefused(
                f"model {slug!r}: prices above the pool's ceiling for it ({_usd_per_million(ceiling.input)} in, "
                f"{_usd_per_million(ceiling.output)} out per 1M tokens)"
            )
        if offer.context_window is not None and offer.context_window <= 0:
            raise HelloRefused(f"model {slug!r}: context_window must be positive")
        quantization = quantization_label(offer.quantization or normalize(offer.backend_model)[1] or "")
        if len(quantization) > MAX_QUANTIZATION:
            raise HelloRefused(f"model {slug!r}: quantization must be at most {MAX_QUANTIZATION} characters")
        listed = directory.entries[slug].quantizations
        if quantization and listed and quantization not in listed:
            # A label nobody else announces would have no canary reference to be checked against.
            raise HelloRefused(
                f"model {slug!r}: quantization {quantization!r} is not one the directory lists for it "
                f"({', '.join(listed)}); announce one of those, or ask the operator to add it"
            )
        kinds = _kinds(slug, offer.kinds, directory.entries[slug].embeds) if hello.protocol > 1 else []
        if hello.protocol == 1 and directory.entries[slug].embeds:
            raise HelloRefused(f"model {slug!r} is an embedding model: serving it needs pool-agent with job kinds")
        offers[slug] = msgspec.structs.replace(offer, slug=slug, quantization=quantization, kinds=kinds)
    return offers


def _kinds(slug: str, announced: list[str], embeds: bool) -> list[str]:
    """The job kinds an offer is taken for: those this coordinator knows (a newer agent's others
    are ignored) that the directory's entry allows (an embedding model embeds, other models chat
    and complete); an offer of none of them serves nothing here."""
    allowed = (protocol.EMBEDDING,) if embeds else (protocol.CHAT, protocol.COMPLETION)
    kinds = [kind for kind in allowed if kind in (announced or [protocol.CHAT])]
    if not kinds:
        served = ", ".join(kind[:20] for kind in (announced or [protocol.CHAT])[:5])
        listed = "as an embedding model" if embeds else "for chat and completions"
        raise HelloRefused(
            f"model {slug!r}: the backend serves it for {served}, and the pool's directory lists it {listed}"
        )
    return [] if kinds == [protocol.CHAT] else kinds
