"""The gateways the pool is measured against — LiteLLM's proxy and Portkey's gateway — installed
outside the project's dependencies (``tests/bench/.peers/``, ignored by git) and started, one
process each, in front of a loopback backend.

Install snags, handled here:
- ``litellm[proxy]==1.109.1`` pins a ``certifi`` (and ``litellm-proxy-extras``) newer than the
  registry has: the wheel goes in with ``--no-deps``, then its requirements without those pins;
- Portkey's gateway streams only with ``@hono/node-server`` 1.13.8, pinned with npm ``overrides``.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from scripts.localpool import Proc, spawn, wait_http

PEERS = Path(__file__).parent / ".peers"
LITELLM = "1.109.1"
PORTKEY = "1.15.2"
HONO_NODE_SERVER = "1.13.8"
UNPINNED = {"certifi", "litellm-proxy-extras", "litellm-enterprise"}  # pins the registry cannot meet


def _run(argv: list[str], cwd: Path | None = None) -> None:
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def litellm_requirements(wheel: Path) -> list[str]:
    """The wheel's requirements for the proxy, with the pins the registry cannot meet dropped."""
    name = wheel.name.split("-")[0]
    with zipfile.ZipFile(wheel) as archive:
        meta = archive.read(f"{name}-{LITELLM}.dist-info/METADATA").decode()
    wanted = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        requirement = Requirement(line.removeprefix("Requires-Dist: "))
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({"extra": extra}) for extra in ("", "proxy")):
            continue
        requirement.marker = None
        wanted.append(requirement.name if requirement.name in UNPINNED else str(requirement))
    return wanted


def install_litellm() -> Path:
    """A venv with LiteLLM's proxy; returns its ``litellm`` command."""
    home = PEERS / "litellm"
    command = home / "bin" / "litellm"
    if (home / f".installed-{LITELLM}").exists():
        return command
    print(f"installing LiteLLM {LITELLM} into {home} …", file=sys.stderr, flush=True)
    venv.create(home, with_pip=True, clear=True)
    pip = str(home / "bin" / "pip")
    wheels = PEERS / "wheels"
    _run([pip, "download", "--quiet", "--no-deps", "-d", str(wheels), f"litellm=={LITELLM}"])
    wheel = next(wheels.glob(f"litellm-{LITELLM}-*.whl"))
    _run([pip, "install", "--quiet", "--no-deps", str(wheel)])
    _run([pip, "install", "--quiet", *litellm_requirements(wheel)])
    (home / f".installed-{LITELLM}").touch()
    return command


def install_portkey() -> Path:
    """Portkey's gateway from npm; returns its server script."""
    home = PEERS / "portkey"
    script = home / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if (home / f".installed-{PORTKEY}").exists():
        return script
    print(f"installing Portkey's gateway {PORTKEY} into {home} …", file=sys.stderr, flush=True)
    home.mkdir(parents=True, exist_ok=True)
    package = {
        "name": "bench-portkey",
        "private": True,
        "dependencies": {"@portkey-ai/gateway": PORTKEY},
        "overrides": {"@hono/node-server": HONO_NODE_SERVER},
    }
    (home / "package.json").write_text(json.dumps(package, indent=2))
    _run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=home)
    (home / f".installed-{PORTKEY}").touch()
    return script


MASTER_KEY = "sk-bench-" + secrets.token_urlsafe(24)  # LiteLLM checks keys, as the pool does


def start_litellm(port: int, backends: dict[str, str], workdir: Path) -> Proc:
    """LiteLLM's proxy (one worker) serving each model from its OpenAI-compatible backend;
    requests carry ``MASTER_KEY``."""
    command = install_litellm()
    config = workdir / "litellm.yaml"
    entries = "".join(
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {backend}/v1\n"
        "      api_key: sk-bench\n"
        for model, backend in backends.items()
    )
    config.write_text(f"general_settings:\n  master_key: {MASTER_KEY}\nmodel_list:\n{entries}")
    proc = spawn(
        "litellm",
        [str(command), "--config", str(config), "--port", str(port), "--num_workers", "1"],
        workdir,
        env={"LITELLM_LOG": "ERROR"},
    )
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout=120)
    return proc


def start_portkey(port: int, workdir: Path) -> Proc:
    """Portkey's gateway (one Node process); requests name the backend in their headers."""
    script = install_portkey()
    proc = spawn(
        "portkey", ["node", str(script), f"--port={port}", "--headless"], workdir, env={"NODE_ENV": "production"}
    )
    wait_http(f"http://127.0.0.1:{port}/", proc, timeout=60)
    return proc


def portkey_headers(backend: str) -> dict[str, str]:
    return {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"{backend}/v1",
        "authorization": "Bearer sk-bench",
    }
