"""``pool-agent run``: serve a local model server to a Provider Pool coordinator."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

from provider_agent.config import ConfigError, load
from provider_agent.connection import run_agent
from shared import logs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pool-agent", description="Provider Pool agent")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="connect to the coordinator and serve jobs")
    run.add_argument("--config", type=Path, help="TOML file with any of the settings below")
    run.add_argument(
        "--coordinator",
        help="coordinator URL, e.g. http://pool.example:8080; several, comma-separated, are tried in turn",
    )
    run.add_argument("--token", help="agent token (pool_agent_…); better via POOL_AGENT_TOKEN")
    run.add_argument("--backend", help="local OpenAI-compatible server, e.g. http://127.0.0.1:8081")
    run.add_argument("--backend-api-key", help="API key the backend expects, if any")
    run.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="SLUG[=BACKEND_NAME]",
        help="model to serve (repeatable)",
    )
    run.add_argument("--price-in", help="USD per 1M prompt tokens")
    run.add_argument("--price-out", help="USD per 1M completion tokens")
    run.add_argument("--max-concurrency", type=int, help="jobs served at once (default 4)")
    run.add_argument("--context-window", type=int, help="context window to announce")
    run.add_argument(
        "--kinds",
        help="job kinds every model serves: chat, completion, embedding, comma-separated "
        "(default: found by asking the backend one tiny request of each at start)",
    )
    run.add_argument("--log-level", help="DEBUG, INFO, WARNING …")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = load(flags, os.environ, args.config)
    except ConfigError as exc:
        print(f"pool-agent: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_agent(config))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it exists (not on Windows): it relays a job with less CPU than asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
