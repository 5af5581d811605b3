"""Placement cost per request over registries of N agents serving one model: ``placement.choose``
(the model's index) beside ``placement.choose(…, scan=True)`` (every agent read, as before the index) for
the default routing (power of two choices) and ``sort`` + ``min_trust``, the hold's prices
(``placement.prices``), and a plain ``random.choice`` over the same agents in the same run (the floor
any placement pays).

``python -m tests.bench.placement [--agents 1,100,1000,10000] [--rounds 2000]``
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from coordinator.market import placement
from coordinator.market.placement import Routing
from coordinator.market.registry import ConnectedAgent, Performance, Registry
from coordinator.market.upstream import Upstream
from shared.openai import ProviderPreferences
from shared.protocol import ModelOffer


class _Link:
    async def send(self, message: object) -> None:
        return None

    async def close(self, code: int, reason: str) -> None:
        return None


def registry_of(count: int, rng: random.Random) -> Registry:
    registry = Registry()
    for i in range(count):
        price = rng.randint(50, 500)
        agent = ConnectedAgent(
            f"agt_{i}", i, i, {"m": ModelOffer("m", "m", price, price * 2)}, 8, _Link(), 0.0, trust=rng.uniform(40, 100)
        )
        agent.in_flight = rng.randint(0, 7)
        agent.performance["m"] = Performance(rng.uniform(50, 500), rng.uniform(10, 200))
        registry.add(agent)
    return registry


def per_call_us(call: Callable[[], object], rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        call()
    return (time.perf_counter() - started) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", default="1,100,1000,10000")
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(1)
    ranked = Routing.of(ProviderPreferences(sort="latency", min_trust=50))
    upstream = Upstream(None, None, {}, 5.0)
    columns = (
        "agents",
        "random.choice",
        "p2c scan",
        "p2c index",
        "sort scan",
        "sort index",
        "prices",
        "p2c scan/index",
    )
    print(" | ".join(f"{c:>14}" for c in columns))
    for count in (int(n) for n in args.agents.split(",")):
        registry = registry_of(count, rng)
        agents = registry.agents()
        scan_rounds = max(20, args.rounds * 100 // max(count, 100))  # the scan at 10,000 takes ms
        figures = [
            per_call_us(lambda agents=agents: rng.choice(agents), args.rounds),
            per_call_us(lambda r=registry: placement.choose(r, "m", rng=rng, scan=True), scan_rounds),
            per_call_us(lambda r=registry: placement.choose(r, "m", rng=rng), args.rounds),
            per_call_us(lambda r=registry: placement.choose(r, "m", ranked, rng=rng, scan=True), scan_rounds),
            per_call_us(lambda r=registry: placement.choose(r, "m", ranked, rng=rng), args.rounds),
            per_call_us(
                lambda r=registry: placement.prices(r, upstream, ["m"], Routing(), trust_floor=40), args.rounds
            ),
        ]
        cells = [f"{count:>14}", *(f"{figure:>11.2f} us" for figure in figures), f"{figures[1] / figures[2]:>13.0f}x"]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
