"""``make cluster``: several coordinators as one pool on this machine — Redis (started if none
answers at ``POOL_CLUSTER_REDIS_URL``, default 127.0.0.1:6379), ``REPLICAS`` coordinator replicas
(default 3) on PostgreSQL (``POOL_CLUSTER_DATABASE_URL``, default the local server's
``pool_cluster`` database, created if missing), HAProxy in front of them with ``deploy/haproxy.cfg``,
and llama.cpp's server with SmolLM2-135M-Instruct behind two agents that dial through HAProxy.
Prints the URL; Ctrl-C stops everything. The cluster tests start the same parts from here."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import redis

from scripts import localpool
from scripts.localpool import Proc

STATE = localpool.ROOT / ".pool" / "cluster"
HAPROXY_CFG = localpool.ROOT / "deploy" / "haproxy.cfg"
MAX_REPLICAS = 5  # servers deploy/haproxy.cfg can name
DEFAULT_DATABASE = "postgresql+asyncpg://postgres@127.0.0.1:5432/pool_cluster"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
SLUG = "smollm2-135m"


@dataclass
class Cluster:
    url: str  # HAProxy: what consumers and agents dial
    env: dict[str, str]  # the replicas' shared settings (admin commands take them too)
    replicas: list[tuple[Proc, str]] = field(default_factory=list)  # each replica and its own URL
    children: list[Proc] = field(default_factory=list)  # everything started, in order

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def ensure_redis(url: str, state: Path) -> tuple[str, Proc | None]:
    """A Redis that answers: ``url``'s, or one started here on a free port."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return url, None
    except redis.RedisError:
        pass
    port = localpool.free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = localpool.spawn("redis", argv, state)
    own = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(own).ping()
            return own, proc
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError(f"redis-server did not start; its log: {proc.log_path}")


async def ensure_database(url: str) -> None:
    """Create ``url``'s database if the server does not have it."""
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    name = dsn.rsplit("/", 1)[1].split("?")[0]
    conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres", timeout=5)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def start(
    state: Path,
    database_url: str,
    redis_url: str,
    replicas: int = 3,
    *,
    prefix: str | None = None,
    **settings: str,
) -> Cluster:
    """Migrate the database once, then start ``replicas`` coordinators and HAProxy in front."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"1 to {MAX_REPLICAS} replicas (the servers deploy/haproxy.cfg names)")
    env = localpool.coordinator_env(
        database_url,
        redis_url=redis_url,
        redis_prefix=prefix or f"cluster-{secrets.token_hex(3)}:",
        jwt_secret=settings.pop("jwt_secret", secrets.token_urlsafe(32)),
        drain_notice_seconds=settings.pop("drain_notice_seconds", "2.5"),  # HAProxy's checks notice in 2 s
        **settings,
    )
    subprocess.run([sys.executable, "-m", "coordinator", "migrate"], env={**os.environ, **env}, check=True)
    listen = localpool.free_port()
    cluster = Cluster(f"http://127.0.0.1:{listen}", env)
    try:
        haproxy_env = {"POOL_LISTEN": f"127.0.0.1:{listen}"}
        for n in range(1, replicas + 1):
            port = localpool.free_port()
            proc = localpool.start_coordinator(port, {**env, "POOL_REPLICA_NAME": f"r{n}"}, state, name=f"replica-{n}")
            cluster.children.append(proc)
            cluster.replicas.append((proc, f"http://127.0.0.1:{port}"))
            haproxy_env[f"POOL_REPLICA_{n}"] = f"127.0.0.1:{port}"
        haproxy = localpool.spawn("haproxy", ["haproxy", "-db", "-f", str(HAPROXY_CFG)], state, haproxy_env)
        cluster.children.append(haproxy)
        localpool.wait_http(f"{cluster.url}/readyz", haproxy, timeout=20)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    replicas = int(os.environ.get("REPLICAS", "3"))
    database_url = os.environ.get("POOL_CLUSTER_DATABASE_URL", DEFAULT_DATABASE)
    stopping: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _: stopping.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _: stopping.append(signum))
    children: list[Proc] = []  # llama.cpp and the agents
    cluster: Cluster | None = None
    own_redis: Proc | None = None
    try:
        redis_url, own_redis = ensure_redis(os.environ.get("POOL_CLUSTER_REDIS_URL", DEFAULT_REDIS), STATE)
        asyncio.run(ensure_database(database_url))
        print(f"starting {replicas} coordinators on {database_url} and {redis_url}, HAProxy in front …", flush=True)
        cluster = start(STATE, database_url, redis_url, replicas, prefix="cluster:")
        env = cluster.env
        email = "cluster@example.com"
        _try_admin(env, "create-user", "--email", email)
        localpool.admin(env, "grant-credits", "--email", email, "--usd", "10")
        key = localpool.admin(env, "create-key", "--email", email, "--name", "cluster")
        token = localpool.admin(env, "create-agent-token", "--email", email, "--name", "cluster")
        print("starting llama.cpp's server with SmolLM2-135M-Instruct and two agents …", flush=True)
        llama_port = localpool.free_port()
        children.append(localpool.start_llama(localpool.smollm2_path(), llama_port, STATE, parallel=4))
        backend = f"http://127.0.0.1:{llama_port}"
        for n in (1, 2):
            agent = localpool.start_agent(
                cluster.url, token, backend, [SLUG], STATE, name=f"agent-{n}", max_concurrency=2
            )
            children.append(agent)
        _wait_agents(cluster, 2)
        print(_instructions(cluster, key), flush=True)
        if localpool.wait_until_stopped(children + cluster.children, stopping):
            return 1
    except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as exc:
        print(f"cluster failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping …", flush=True)
        for child in reversed(children):
            child.stop()
        if cluster is not None:
            cluster.stop()
        if own_redis is not None:
            own_redis.stop()
    print("stopped.")
    return 0


def _try_admin(env: dict[str, str], *args: str) -> str:
    try:
        return localpool.admin(env, *args)
    except RuntimeError as exc:  # the user is there from an earlier run
        return str(exc)


def _wait_agents(cluster: Cluster, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agents = sum(int(httpx.get(f"{url}/healthz", timeout=5).json()["agents"]) for _, url in cluster.replicas)
        if agents >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{count} agents did not connect within {timeout:g} s")


def _instructions(cluster: Cluster, key: str) -> str:
    replicas = "\n".join(f"  {proc.name}: {url}" for proc, url in cluster.replicas)
    return f"""
Ready: {cluster.url} (HAProxy). Logs in {STATE}. Press Ctrl-C to stop everything.
Replicas, each also reachable on its own:
{replicas}

  curl -s {cluster.url}/v1/chat/completions \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"model": "{SLUG}", "messages": [{{"role": "user", "content": "Name three colors."}}]}}'

x_pool.replica says which replica served a request, x_pool.agent_replica which one held the agent.
Status: {cluster.url}/status   Metrics of one replica: <replica URL>/metrics
"""


if __name__ == "__main__":
    sys.exit(main())
