"""Closed-loop throughput: the requests per second a gateway sustains on one CPU core.

The gateway's processes (for the pool: coordinator and agent) run on core 0; the load generator
(``wrk``: N connections, each sending its next request when the last answer is in) and the stand-in
backend run on core 1. At each concurrency level: requests/s, latency p50/p99, errors (socket
errors and non-200 answers), the CPU time each gateway process spends per request, how busy each
core was, and the gateway's resident memory. The ``direct`` sweep — wrk straight to the stand-in,
both on core 1 — is what the load side can do on its own: a gateway far below it, with core 1 not
saturated, is measured and not the load generator.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench import procs
from tests.bench.common import Endpoint

LEVELS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
P99_LIMITS_MS = (10, 50, 100)
GATEWAY_CORE, LOAD_CORE = 0, 1
GIVE_UP_MS = 300.0  # past this p99 (or any error), higher levels cannot meet any limit

_LUA = """wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{{"requests": %d, "seconds": %f, "errors": %d, "non200": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class Step:
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    cpu_ms: dict[str, float]  # per request, by process label
    core_busy: list[float]  # share of time each core was busy
    rss_kb: int


@dataclass
class Sweep:
    gateway: str
    steps: list[Step] = field(default_factory=list)
    memory_kb: dict[str, int] = field(default_factory=dict)  # idle, load (peak), after

    def best(self, p99_limit_ms: float) -> Step | None:
        """The fastest level with p99 under the limit and no error."""
        fits = [s for s in self.steps if s.errors == 0 and s.p99_ms < p99_limit_ms]
        return max(fits, key=lambda s: s.rps, default=None)

    def per_front_core(self) -> float | None:
        """Requests per second one core of the front process (the first one: the pool's coordinator)
        would serve, from its CPU time per request at the best level with p99 under 100 ms."""
        step = self.best(max(P99_LIMITS_MS))
        if step is None or not step.cpu_ms:
            return None
        return 1000 / next(iter(step.cpu_ms.values()))

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"steps": [vars(s) for s in self.steps], "memory_kb": self.memory_kb}
        out["rps_per_front_core"] = self.per_front_core()
        for limit in P99_LIMITS_MS:
            step = self.best(limit)
            out[f"rps_p99_under_{limit}ms"] = step.rps if step else None
            out[f"cpu_ms_per_request_p99_under_{limit}ms"] = step.cpu_ms if step else None
        return out


def script(body: bytes, headers: dict[str, str], workdir: Path, name: str) -> Path:
    path = workdir / f"wrk-{name}.lua"
    lines = "\n".join(f'wrk.headers["{k}"] = [[{v}]]' for k, v in headers.items())
    path.write_text(_LUA.format(body=body.decode(), headers=lines))
    return path


def wrk(url: str, lua: Path, connections: int, seconds: float) -> subprocess.Popen[str]:
    argv = ["taskset", "-c", str(LOAD_CORE), shutil.which("wrk") or "wrk", "-t1", f"-c{connections}"]
    argv += [f"-d{seconds:g}s", "--timeout", "5s", "-s", str(lua), url]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-500:]}")
    parsed: dict[str, float] = json.loads(lines[-1])
    return parsed


def step(gateway: Endpoint, lua: Path, connections: int, seconds: float) -> Step:
    """One level: wrk for ``seconds``, the gateway's CPU before and after, its memory halfway."""
    everyone = gateway.pids
    cpu = {label: procs.cpu_seconds(pids) for label, pids in gateway.processes.items()}
    cores = procs.core_busy()
    proc = wrk(gateway.url, lua, connections, seconds)
    sampled: list[int] = []
    sampler = threading.Timer(seconds / 2, lambda: sampled.append(procs.rss_kb(everyone)))
    sampler.start()
    figures = finish(proc)
    sampler.join()
    requests = max(1, int(figures["requests"]))
    return Step(
        connections=connections,
        rps=figures["requests"] / figures["seconds"],
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
        errors=int(figures["errors"] + figures["non200"]),
        cpu_ms={
            label: (procs.cpu_seconds(pids) - cpu[label]) * 1000 / requests for label, pids in gateway.processes.items()
        },
        core_busy=procs.busy_share(cores, procs.core_busy()),
        rss_kb=sampled[0] if sampled else 0,
    )


def sweep(gateway: Endpoint, body: bytes, workdir: Path, seconds: float, levels: tuple[int, ...] = LEVELS) -> Sweep:
    """Pin the gateway, warm it up, then run wrk at each level until it can no longer meet a limit."""
    everyone = gateway.pids
    lua = script(body, gateway.headers, workdir, gateway.name)
    result = Sweep(gateway.name)
    procs.pin(everyone, {GATEWAY_CORE})
    try:
        result.memory_kb["idle"] = procs.rss_kb(everyone)
        finish(wrk(gateway.url, lua, 8, 2))  # warm-up, not counted
        for connections in levels:
            level = step(gateway, lua, connections, seconds)
            result.steps.append(level)
            cpu_text = " ".join(f"{label} {ms:.3f}" for label, ms in level.cpu_ms.items())
            print(
                f"{gateway.name:>8} {connections:>5} | {level.rps:>8.0f} {level.p50_ms:>8.2f} {level.p99_ms:>8.2f}"
                f" {level.errors:>6} | {' '.join(f'{b:>4.0%}' for b in level.core_busy)} | {cpu_text}",
                flush=True,
            )
            if level.errors or level.p99_ms > GIVE_UP_MS:
                break
        result.memory_kb["load"] = max(level.rss_kb for level in result.steps)
        time.sleep(2)
        result.memory_kb["after"] = procs.rss_kb(everyone)
    finally:
        procs.unpin(everyone)
    return result


def run(gateways: list[Endpoint], body: bytes, workdir: Path, seconds: float, load_pids: list[int]) -> list[Sweep]:
    """Sweep each gateway in turn, the stand-in (``load_pids``) on the load core throughout."""
    procs.pin(load_pids, {LOAD_CORE})
    print(f"\nthroughput: closed loop, {seconds:g} s a level; gateway on core {GATEWAY_CORE}, wrk + stand-in on core")
    print(f"{LOAD_CORE}; CPU = ms of CPU time per request, by process")
    print(f"{'target':>8} {'conns':>5} | {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} | core0 core1 | CPU")
    try:
        return [sweep(gateway, body, workdir, seconds) for gateway in gateways]
    finally:
        procs.unpin(load_pids)


def report(sweeps: list[Sweep]) -> None:
    print(f"\nthroughput on one core: highest req/s with p99 under {', '.join(map(str, P99_LIMITS_MS))} ms, no errors")
    print(f"{'target':>8} | {'  '.join(f'p99<{limit:>3} ms' for limit in P99_LIMITS_MS)} | CPU ms/request at the best")
    for result in sweeps:
        cells = []
        for limit in P99_LIMITS_MS:
            step = result.best(limit)
            cells.append(f"{step.rps:>11.0f}" if step else f"{'-':>11}")
        top = result.best(max(P99_LIMITS_MS))
        cpu = " ".join(f"{label} {ms:.3f}" for label, ms in top.cpu_ms.items()) if top else ""
        print(f"{result.gateway:>8} | {'  '.join(cells)} | {cpu}")
    fronts = {r.gateway: rate for r in sweeps if (rate := r.per_front_core())}
    if fronts:
        print("\nreq/s per core of the front process (the pool's coordinator), from its CPU per request:")
        print("  " + " | ".join(f"{name} {rate:.0f}" for name, rate in fronts.items()))
        pool, peers = fronts.get("pool"), {n: rate for n, rate in fronts.items() if n != "pool"}
        if pool and peers:
            print("  pool is " + ", ".join(f"{pool / rate:.1f}x {n}" for n, rate in peers.items()))
    print("\nmemory (RSS of the gateway's processes, KB)")
    for result in sweeps:
        memory = result.memory_kb
        print(f"{result.gateway:>8} | idle {memory['idle']:>8} | load {memory['load']:>8} | after {memory['after']:>8}")
