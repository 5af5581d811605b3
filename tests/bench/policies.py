"""What key policies cost, measured in one run.

1. Data protection alone (``forward.protect`` with every detector on, redacting): time per prompt
   of 1 KB, 16 KB and 128 KB of ordinary text with a few e-mail addresses, a card and a phone number
   sprinkled in, beside the time to merely decode and encode the same body.
2. Through a real coordinator and agent (a zero-delay stand-in backend): the same 1 KB request with
   a key that has no policy and a key with a full policy (models, price cap, spend caps, every
   detector), interleaved at concurrency 1; p50/p99 and what the policy adds.

    .venv/bin/python -m tests.bench.policies [--rounds 300]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

from coordinator.core import dlp
from coordinator.market.forward import protect
from scripts import localpool
from tests.bench.common import pct, pool_under_load

SLUG = "smollm2-135m"
WORDS = [
    "the",
    "pool",
    "routes",
    "each",
    "request",
    "to",
    "the",
    "best",
    "agent",
    "and",
    "relays",
    "the",
    "stream",
    "while",
    "the",
    "ledger",
    "books",
    "every",
    "charge",
    "twice",
    "so",
    "that",
    "the",
    "books",
    "always",
    "balance",
    "and",
    "nobody",
    "pays",
    "for",
    "what",
    "was",
    "not",
    "delivered",
]
SPRINKLES = ["ann@example.org", "4111 1111 1111 1111", "+44 20 7946 0958", "bob.smith@example.com"]


def prompt(size: int, rng: random.Random) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(SPRINKLES) if rng.random() < 0.01 else rng.choice(WORDS))
    return " ".join(words)[:size]


def body_of(text: str) -> bytes:
    return msgspec.json.encode({"model": SLUG, "messages": [{"role": "user", "content": text}], "max_tokens": 16})


def time_per_call(call: object, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        call()  # type: ignore[operator]
    return (time.perf_counter() - started) / repeat * 1000


def detectors_alone() -> None:
    rng = random.Random(7)
    actions = dict.fromkeys(dlp.DETECTORS, dlp.REDACT)
    print("data protection, every detector on (redacting), ms per prompt:")
    print(f"{'size':>7} | {'protect':>9} | {'decode+encode only':>18} | {'added':>8} | found")
    for size in (1024, 16 * 1024, 128 * 1024):
        body = body_of(prompt(size, rng))
        repeat = max(5, 2000 // (size // 1024))
        protected = time_per_call(lambda body=body: protect(body, actions), repeat)
        baseline = time_per_call(lambda body=body: msgspec.json.encode(msgspec.json.decode(body)), repeat)
        found = protect(body, actions).found
        print(f"{size // 1024:>5} KB | {protected:>9.3f} | {baseline:>18.3f} | {protected - baseline:>+8.3f} | {found}")


def through_the_pool(rounds: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pool-bench-policies-"))
    pool = pool_under_load(workdir)
    pool.start()
    try:
        pool.agent(pool.standin(), [SLUG], max_concurrency=8, extra_env={"POOL_AGENT_LOG_LEVEL": "WARNING"})
        email = "policy-bench@example.com"
        localpool.admin(pool.env, "create-user", "--email", email)
        localpool.admin(pool.env, "grant-credits", "--email", email, "--usd", "100")
        plain, governed = (localpool.admin(pool.env, "create-key", "--email", email) for _ in range(2))
        full = {
            "models": ["smollm2", "gemma"],
            "maxPrice": {"prompt": 10, "completion": 10},
            "spendCap": {"day": 50, "month": 100},
            "project": "bench",
            "dlp": dict.fromkeys(dlp.DETECTORS, dlp.REDACT),
        }
        ids = [row[0] for row in pool.query("SELECT id FROM api_keys ORDER BY id")]  # the governed key: the newest
        localpool.admin(
            pool.env, "set-key-policy", "--key-id", str(ids[-1]), "--policy", msgspec.json.encode(full).decode()
        )
        body = msgspec.json.decode(body_of(prompt(1024, random.Random(3))))
        times: dict[str, list[float]] = {"no policy": [], "full policy": []}
        keys = {"no policy": plain, "full policy": governed}
        with httpx.Client(timeout=30) as client:
            for _ in range(rounds + 20):
                for name in random.sample(list(keys), 2):
                    started = time.perf_counter()
                    response = client.post(
                        f"{pool.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {keys[name]}"}
                    )
                    response.raise_for_status()
                    times[name].append((time.perf_counter() - started) * 1000)
        print(f"\nthrough coordinator + agent, 1 KB prompt, concurrency 1, {rounds} interleaved rounds (ms):")
        base = times["no policy"][20:]
        for name, values in times.items():
            values = values[20:]  # the first rounds warm up
            print(
                f"{name:>12} | p50 {pct(values, 0.5):6.2f} ({pct(values, 0.5) - pct(base, 0.5):+.2f}) | "
                f"p99 {pct(values, 0.99):6.2f} ({pct(values, 0.99) - pct(base, 0.99):+.2f})"
            )
    finally:
        pool.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    detectors_alone()
    through_the_pool(args.rounds)


if __name__ == "__main__":
    main()
