"""``make demo``: a whole pool on this machine — llama.cpp's server with SmolLM2-135M-Instruct, the
coordinator on SQLite and one agent serving it as ``smollm2-135m``. Ctrl-C stops every child."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
from pathlib import Path

import httpx

from scripts import localpool

STATE = localpool.ROOT / ".pool" / "demo"
SLUG = "smollm2-135m"
# The demo's model is SmolLM2-135M-Instruct: small enough for any CPU, too small for facts (asked for
# France's capital it rambles in French). This question it answers right, at temperature 0.
FIRST_QUESTION = "Name three colors."


def _port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return localpool.free_port()
    return preferred


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    db_path = STATE / "pool.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    env = localpool.coordinator_env(f"sqlite+aiosqlite:///{db_path}", jwt_secret=secrets.token_urlsafe(32))
    port = _port(int(os.environ.get("DEMO_PORT", "8080")))
    base = f"http://127.0.0.1:{port}"
    # A plain flag: a handler that takes a lock (as Event.set does) can deadlock against the very
    # wait it interrupts, which holds that lock.
    stopping: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _: stopping.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _: stopping.append(signum))
    children: list[localpool.Proc] = []
    try:
        print("starting llama.cpp's server with SmolLM2-135M-Instruct …", flush=True)
        llama_port = localpool.free_port()
        children.append(localpool.start_llama(localpool.smollm2_path(), llama_port, STATE, parallel=2))
        localpool.admin(env, "create-user", "--email", "demo@example.com")
        localpool.admin(env, "grant-credits", "--email", "demo@example.com", "--usd", "10")
        key = localpool.admin(env, "create-key", "--email", "demo@example.com", "--name", "demo")
        token = localpool.admin(env, "create-agent-token", "--email", "demo@example.com", "--name", "demo")
        print(f"starting the coordinator on {base} …", flush=True)
        coordinator = localpool.start_coordinator(port, env, STATE)
        children.append(coordinator)
        agent = localpool.start_agent(base, token, f"http://127.0.0.1:{llama_port}", [SLUG], STATE, max_concurrency=2)
        children.append(agent)
        localpool.wait_agents(base, 1, agent)
        reply = httpx.post(
            f"{base}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={
                "model": SLUG,
                "messages": [{"role": "user", "content": FIRST_QUESTION}],
                "max_tokens": 30,
                "temperature": 0,  # the answer a 135M model gets right, every time
            },
            timeout=60,
        ).json()
        print(f"\nfirst answer through the pool: {reply['choices'][0]['message']['content']!r}")
        print(_instructions(base, key), flush=True)
        if localpool.wait_until_stopped(children, stopping):
            return 1
    except (RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping …", flush=True)
        for child in reversed(children):
            child.stop()
    print("stopped.")
    return 0


def _instructions(base: str, key: str) -> str:
    return f"""
Ready. Logs in {STATE}. Press Ctrl-C to stop everything.

curl:
  curl -s {base}/v1/chat/completions \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"model": "{SLUG}", "messages": [{{"role": "user", "content": "{FIRST_QUESTION}"}}], "temperature": 0}}'

OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  stream = client.chat.completions.create(
      model="{SLUG}", messages=[{{"role": "user", "content": "What is 2 + 2?"}}], stream=True)
  for chunk in stream:
      print(chunk.choices[0].delta.content or "", end="", flush=True)

Status page: {base}/status   Developer portal (sign up there): {base}/portal
Directory: {base}/v1/models   Status: {base}/v1/pool/status   API schema: {base}/schema
"""


if __name__ == "__main__":
    sys.exit(main())
