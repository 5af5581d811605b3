"""A pool of real processes for tests: coordinator, agents, stand-in backends."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from openai import OpenAI

from coordinator.core import db
from coordinator.identity import keys, users
from coordinator.money import ledger
from scripts import localpool
from scripts.localpool import Proc
from shared.money import usd_to_nano
from tests.waiting import eventually

T = TypeVar("T")
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
ADMIN_TOKEN = "test-admin-token"
CONSUMER = "consumer@example.com"
PROVIDER = "provider@example.com"


class Pool:
    def __init__(self, workdir: Path, db_url: str | None = None, credits_usd: str = "1000", **settings: str) -> None:
        self.dir = workdir
        self.db_url = db_url or f"sqlite+aiosqlite:///{workdir / 'pool.db'}"
        self.credits_usd = credits_usd
        self.settings = {
            "heartbeat_interval": "0.5",
            "first_chunk_timeout": "30",
            "jwt_secret": JWT_SECRET,
            "admin_token": ADMIN_TOKEN,
            # Close credit leases soon after the last request, so tests see settled books quickly.
            "credit_lease_idle_seconds": "0.3",
            # New agents run at most 2 consumer jobs at once until trusted, agents below trust 40 get
            # no traffic, and verification jobs mix in. Tests of load, failover and money make the one
            # test provider fail on purpose and count its jobs: they run without those rules, which
            # tests/integration/test_trust.py and tests/e2e/test_trust.py check with the defaults.
            "new_agent_concurrency": "64",
            "trust_threshold": "0",
            "canary_interval_seconds": "0",
            # Tests sign many users up from 127.0.0.1; tests/integration/test_identity.py checks the limit.
            "signups_per_hour": "10000",
            # Tests poll the public routes from 127.0.0.1; tests/integration/test_price_board.py checks the limits.
            "public_rpm": "100000",
            "public_rpm_keyed": "100000",
            # … and read them right after a change: views cached 50 ms (test_price_board.py checks the cache)
            "public_cache_seconds": "0.05",
            # A stopped coordinator drains (SIGTERM): requests a test left open get 5 s, not 30.
            "drain_timeout": "5",
            **settings,
        }
        self.env = localpool.coordinator_env(self.db_url, **self.settings)
        self.port = localpool.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.coordinator: Proc | None = None
        self.agents: list[Proc] = []
        self.backends: list[Proc] = []
        self.key = ""
        self.token = ""
        self.extra: dict[str, str] = {}  # URLs a fixture wants to hand to its tests
        self._names = 0

    def start(self) -> None:
        self.key, self.token = asyncio.run(_seed(self.db_url, self.credits_usd))
        self.coordinator = localpool.start_coordinator(self.port, self.env, self.dir)

    def restart(self, **settings: str) -> None:
        """Restart the coordinator with other settings (same database, same keys)."""
        assert self.coordinator is not None
        self.stop_agents()
        self.coordinator.stop()
        self.settings.update(settings)
        self.env = localpool.coordinator_env(self.db_url, **self.settings)
        self.coordinator = localpool.start_coordinator(self.port, self.env, self.dir, name=self._name("coordinator"))

    def stop(self) -> None:
        self.stop_agents()
        localpool.stop_all(self.backends, timeout=2.0)  # a stand-in holding a hung request need not drain
        if self.coordinator is not None:
            self.coordinator.stop()

    def _name(self, kind: str) -> str:
        self._names += 1
        return f"{kind}{self._names}"

    # --- agents and backends -------------------------------------------------------------------

    def standin(self, **options: object) -> str:
        """Start a stand-in backend; returns its base URL."""
        port = localpool.free_port()
        self.backends.append(localpool.start_standin(port, self.dir, name=self._name("standin"), **options))  # type: ignore[arg-type]
        return f"http://127.0.0.1:{port}"

    def agent(
        self,
        backend: str,
        models: list[str],
        wait: bool = True,
        token: str | None = None,
        coordinator: str | None = None,
        **kw: object,
    ) -> Proc:
        """An agent of ``backend``, on this pool's coordinator (or the ``coordinator`` URLs given)."""
        before = self.agent_count()
        proc = localpool.start_agent(
            coordinator or self.url,
            token or self.token,
            backend,
            models,
            self.dir,
            name=self._name("agent"),
            **kw,  # type: ignore[arg-type]
        )
        self.agents.append(proc)
        if wait:
            localpool.wait_agents(self.url, before + 1, proc)
        return proc

    def stop_agents(self) -> None:
        localpool.stop_all(self.agents)
        for proc in self.agents:
            if proc.alive():
                proc.popen.kill()
        self.agents.clear()
        if self.coordinator is not None and self.coordinator.alive():
            self.wait_agent_count(0)

    def agent_count(self) -> int:
        return agents_at(self.url)

    def wait_agent_count(self, count: int, timeout: float = 15.0) -> None:
        eventually(lambda: self.agent_count() == count, timeout, explain=lambda: f"{self.agent_count()} agents")

    # --- consumers -----------------------------------------------------------------------------

    def sign_up(self, email: str, password: str) -> dict[str, Any]:
        """Sign up through the API, then log in (signup returns no session); the login body."""
        credentials = {"email": email, "password": password}
        signup = httpx.post(f"{self.url}/v1/auth/signup", json=credentials, timeout=30)
        assert signup.status_code == 202, signup.text
        login = httpx.post(f"{self.url}/v1/auth/login", json=credentials, timeout=30)
        assert login.status_code == 200, login.text
        return dict(login.json())

    def new_provider(self, name: str) -> tuple[str, str]:
        """A new provider ``name@providers.example``: its agent token and a consumer key to read its
        provider API with."""
        return in_thread(_new_provider(self.db_url, f"{name}@providers.example"))

    def new_consumer(self, email: str, usd: str = "1", keys: int = 1) -> list[str]:
        """A new account ``email`` with ``usd`` of credit and ``keys`` consumer keys, made here (as
        ``pool-coordinator admin`` would, without its process)."""
        return in_thread(new_consumer(self.db_url, email, usd, keys))

    def grant(self, email: str, usd: str) -> None:
        """Credit ``usd`` to ``email``'s wallet, as ``admin grant-credits`` does."""
        in_thread(grant(self.db_url, email, usd))

    def standing(self, key: str) -> dict[str, Any]:
        """``GET /v1/provider/agents`` as the provider of ``key``, who has exactly one agent token."""
        response = httpx.get(f"{self.url}/v1/provider/agents", headers={"authorization": f"Bearer {key}"}, timeout=10)
        assert response.status_code == 200, response.text
        agents = response.json()["agents"]
        assert len(agents) == 1
        return dict(agents[0])

    def client(self, **kw: object) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, **kw)  # type: ignore[arg-type]

    def post(self, body: object = None, content: bytes | None = None, key: str | None = None) -> httpx.Response:
        secret = key if key is not None else self.key
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        if content is not None:
            headers["content-type"] = "application/json"
            return httpx.post(f"{self.url}/v1/chat/completions", headers=headers, content=content, timeout=60)
        return httpx.post(f"{self.url}/v1/chat/completions", headers=headers, json=body, timeout=60)

    def generation(self, generation_id: str, key: str | None = None) -> dict[str, Any] | None:
        """``GET /v1/generation/{id}`` as the consumer (``None`` until the request is logged)."""
        headers = {"authorization": f"Bearer {key or self.key}"}
        response = httpx.get(f"{self.url}/v1/generation/{generation_id}", headers=headers, timeout=10)
        return dict(response.json()) if response.status_code == 200 else None

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Rows from the pool's SQLite database (read-only)."""
        path = self.db_url.removeprefix("sqlite+aiosqlite:///")
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute(sql, args).fetchall()

    def status(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.url}/v1/pool/status", timeout=5).json())


async def _seed(db_url: str, credits_usd: str) -> tuple[str, str]:
    """A new pool's database as ``pool-coordinator admin`` would leave it (migrated; the consumer
    with credits and a key, the provider with an agent token), done here: each admin command is a
    Python process of its own, about 1.5 s, and every pool needed five. Returns (key, token)."""
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        async with db.sessionmaker(engine)() as session, session.begin():
            consumer = await users.create_user(session, CONSUMER)
            await users.create_user(session, PROVIDER)
            key = await users.create_api_key(session, CONSUMER)
            token = await users.create_agent_token(session, PROVIDER)
        if credits_usd:
            amount = usd_to_nano(credits_usd, ledger.MAX_GRANT_USD)
            await ledger.topup(engine, f"seed:{consumer.id}", consumer.id, amount)
        return key, token
    finally:
        await engine.dispose()


def in_thread(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end from synchronous code, whether or not an event loop runs here (an
    async test's helpers are synchronous)."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, work).result()


async def new_consumer(db_url: str, email: str, usd: str = "1", keys: int = 1) -> list[str]:
    """A new account with credit and consumer keys in the database at ``db_url``; the keys."""
    engine = db.create_engine(db_url)
    try:
        async with db.sessionmaker(engine)() as session, session.begin():
            user = await users.create_user(session, email)
            made = [await users.create_api_key(session, email) for _ in range(keys)]
        if usd and usd != "0":
            await ledger.topup(engine, f"test:{secrets.token_hex(8)}", user.id, usd_to_nano(usd, ledger.MAX_GRANT_USD))
        return made
    finally:
        await engine.dispose()


async def grant(db_url: str, email: str, usd: str) -> None:
    engine = db.create_engine(db_url)
    try:
        async with db.sessionmaker(engine)() as session:
            user = await users.user_by_email(session, email)
        await ledger.topup(engine, f"test:{secrets.token_hex(8)}", user.id, usd_to_nano(usd, ledger.MAX_GRANT_USD))
    finally:
        await engine.dispose()


async def _new_provider(db_url: str, email: str) -> tuple[str, str]:
    engine = db.create_engine(db_url)
    try:
        async with db.sessionmaker(engine)() as session, session.begin():
            await users.create_user(session, email)
            return await users.create_agent_token(session, email), await users.create_api_key(session, email)
    finally:
        await engine.dispose()


def last_request(backend: str) -> dict[str, Any]:
    """The last request body a stand-in backend received (``{}`` before the first)."""
    return dict(httpx.get(f"{backend}/_last", timeout=5).json())


def with_upstream(workdir: Path, models: str, chunks: int = 3, **settings: str) -> Pool:
    """A pool (not yet started) whose platform upstream is a loopback stand-in serving ``models``
    (``slug=upstream-id,…``); its base URL is in ``extra["upstream"]``."""
    port = localpool.free_port()
    upstream = localpool.start_standin(port, workdir, name="upstream", chunks=chunks)
    pool = Pool(workdir, upstream_base_url=f"http://127.0.0.1:{port}/v1", upstream_models=models, **settings)
    pool.backends.append(upstream)
    pool.extra["upstream"] = f"http://127.0.0.1:{port}"
    return pool


STRIPE_SECRET = "whsec_test_0123456789abcdef"


def with_stripe(workdir: Path, db_url: str | None = None, **settings: str) -> Pool:
    """A pool (not yet started) whose payment provider is Stripe's stand-in on loopback, sending its
    webhooks to the pool; the stand-in's base URL is in ``extra["stripe"]``."""
    port = localpool.free_port()
    pool = Pool(
        workdir,
        db_url,
        stripe_secret_key="sk_test_standin",
        stripe_webhook_secret=STRIPE_SECRET,
        stripe_api_base=f"http://127.0.0.1:{port}",
        **settings,
    )
    pool.settings.setdefault("public_url", pool.url)
    pool.env = localpool.coordinator_env(pool.db_url, **pool.settings)
    webhook = f"{pool.url}/v1/payments/stripe/webhook"
    pool.backends.append(localpool.start_stripe(port, workdir, webhook, STRIPE_SECRET))
    pool.extra["stripe"] = f"http://127.0.0.1:{port}"
    return pool


def agents_at(url: str) -> int:
    """The agents connected to the coordinator at ``url`` (itself, not other replicas' it mirrors)."""
    return int(httpx.get(f"{url}/healthz", timeout=5).json()["agents"])


async def key_id_of(database_url: str, key: str) -> int:
    """The id of a consumer key, from a PostgreSQL database (0 if it is not there)."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    try:
        return int(await conn.fetchval("SELECT id FROM api_keys WHERE digest = $1", keys.digest(key)) or 0)
    finally:
        await conn.close()
