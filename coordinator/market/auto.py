"""``model: "auto"``: the pool picks the model. Pure: the directory, who can serve now, and the
request's needs in; a choice (or why there is none) out.

A model fits when the key's policy allows it, its context window holds the prompt's bound plus the
output the request asks for, it calls tools when the request brings tools and keeps to JSON when the
request asks for JSON mode (the directory's ``tools`` and ``json`` use cases), and someone can serve
it now within the request's routing (the key's price cap and privacy tier included). Of those, the
cheapest for this request's worst case wins; ``x_pool.auto`` says which, why and among which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from coordinator.market.catalog import Directory
from coordinator.market.placement import Offers
from coordinator.money.metering import Price

AUTO = "auto"
DEFAULT_OUTPUT = 256  # output tokens a request that names no limit needs room for, at least


class AutoChoice(msgspec.Struct):
    """What ``x_pool.auto`` shows."""

    chosen: str
    reason: str
    considered: list[str]  # the models that fitted, cheapest first


@dataclass(frozen=True)
class Needs:
    prompt_tokens: int  # the prompt's bound
    output_tokens: int  # what the request asks for (or DEFAULT_OUTPUT)
    tools: bool
    json: bool


class NothingFits(Exception):
    """No model fits the request (``serving``: some fit, but nobody can serve them now)."""

    def __init__(self, message: str, serving: bool = False) -> None:
        super().__init__(message)
        self.serving = serving


def choose(
    directory: Directory,
    slugs: list[str],
    needs: Needs,
    allowed: Callable[[str, str | None], bool],
    offers: Callable[[str], Offers],
    cost: Callable[[Price], int],
) -> AutoChoice:
    """The cheapest model of ``slugs`` (the directory's, and what the upstream serves) that fits."""
    fitting: list[str] = []
    for slug in sorted(slugs):
        info = directory.get(slug)
        family = info.family if info else None
        if not allowed(slug, family):
            continue
        window = info.context_window if info else None
        if window is None or window < needs.prompt_tokens + needs.output_tokens:
            continue
        uses = set(info.use_cases) if info else set()
        if info is not None and info.embeds:  # not a chat model
            continue
        if (needs.tools and "tools" not in uses) or (needs.json and "json" not in uses and "tools" not in uses):
            continue
        fitting.append(slug)
    if not fitting:
        wanted = [f"a context of {needs.prompt_tokens + needs.output_tokens} tokens"]
        wanted += ["tools"] * needs.tools + ["JSON mode"] * needs.json
        raise NothingFits(f"No model this key may use fits the request ({', '.join(wanted)}).")
    priced = [(cost(offer.cheapest(cost)), slug) for slug in fitting if (offer := offers(slug))]
    if not priced:
        raise NothingFits(f"No agent can serve a model that fits the request now ({', '.join(fitting)}).", True)
    priced.sort()
    considered = [slug for _, slug in priced]
    needed = ["context"] + ["tools"] * needs.tools + ["json"] * needs.json
    reason = f"cheapest of {len(considered)} that fit ({', '.join(needed)}) and can be served now"
    return AutoChoice(considered[0], reason, considered)
