"""Placement cost per request: ``placement.choose`` over registries of N agents serving one model,
beside a plain ``random.choice`` over the same agents in the same run (the floor any placement pays).

``python -m tests.bench.placement [--agents 1,10,100,1000] [--rounds 2000]``
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from coordinator.market import placement
from coordinator.market.placement import Routing
from coordinator.market.registry import ConnectedAgent, Performance, Registry
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
    parser.add_argument("--agents", default="1,10,100,1000")
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(1)
    sorted_routing = Routing.of(ProviderPreferences(sort="latency", min_trust=50))
    header = ("agents", "random.choice", "choose (p2c)", "choose sort+min_trust", "ratio p2c/random")
    print(f"{header[0]:>6} | {header[1]:>13} | {header[2]:>12} | {header[3]:>21} | {header[4]}")
    for count in (int(n) for n in args.agents.split(",")):
        registry = registry_of(count, rng)
        agents = registry.agents()
        floor = per_call_us(lambda agents=agents: rng.choice(agents), args.rounds)
        p2c = per_call_us(lambda r=registry: placement.choose(r, "m", rng=rng), args.rounds)
        ranked = per_call_us(lambda r=registry: placement.choose(r, "m", sorted_routing, rng=rng), args.rounds)
        print(f"{count:>6} | {floor:>10.2f} us | {p2c:>9.2f} us | {ranked:>18.2f} us | {p2c / floor:>8.0f}x")


if __name__ == "__main__":
    main()
