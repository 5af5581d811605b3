"""What the benchmarks share: the percentile they report, the endpoints they load and the pool
they put under load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.harness import Pool


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank from below)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Endpoint:
    """A target's chat completions URL, the headers it wants, and the processes behind it (label ->
    pids), whose CPU time and memory the benchmarks read."""

    name: str
    url: str
    headers: dict[str, str]
    processes: dict[str, list[int]]

    @property
    def pids(self) -> list[int]:
        return [pid for pids in self.processes.values() for pid in pids]


def pool_under_load(workdir: Path, db_url: str | None = None, **settings: str) -> Pool:
    """A pool (not yet started) with credits, rate limits and the request log on, as in production;
    the limits are high enough that a benchmark measures their cost without hitting them."""
    return Pool(
        workdir,
        db_url=db_url,
        log_level="WARNING",
        heartbeat_interval="5",
        rate_limit_rpm="1000000",
        rate_limit_tpm="1000000000",
        credit_lease_idle_seconds="5",
        new_agent_concurrency="1024",  # the agents stand for trusted providers, not newcomers held to 64
        max_connections_per_agent_token="20000",  # the idle-agent figures connect 10,000 on one token
        **settings,
    )
