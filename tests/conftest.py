"""Shared fixtures: real databases (SQLite and PostgreSQL), real pool processes, llama.cpp's server.
What goes where, and how to wait for a condition: tests/README.md."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from scripts import localpool
from tests.harness import Pool

DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
E2E = Path(__file__).parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in tests/e2e (real models, Chromium) is slow: ``make test-fast`` leaves them out."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.slow)


def redis_url() -> str:
    return os.environ.get("POOL_TEST_REDIS_URL", DEFAULT_REDIS)


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    """A Redis key prefix of the module's own on the test Redis (mandatory: a missing server fails)."""
    client = redis.Redis.from_url(redis_url())
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {redis_url()} (set POOL_TEST_REDIS_URL): {exc}")
    name = f"pool-test-{secrets.token_hex(4)}:"
    try:
        yield name
    finally:
        for key in client.scan_iter(f"{name}*"):
            client.delete(key)
        client.close()


def postgres_url() -> str:
    return os.environ.get("POOL_TEST_POSTGRES_URL", DEFAULT_PG)


async def _reset_postgres(url: str) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()


@pytest.fixture
def pg_url() -> str:
    """A freshly emptied PostgreSQL database. Mandatory: a missing server fails the test."""
    url = postgres_url()
    try:
        asyncio.run(_reset_postgres(url))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.fail(f"PostgreSQL is required at {url} (set POOL_TEST_POSTGRES_URL): {exc}")
    return url


async def run_sql(statement: str, dsn: str | None = None) -> None:
    """One statement on PostgreSQL (default: the test server's database)."""
    conn = await asyncpg.connect(dsn or postgres_url().replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def own_database() -> Iterator[str]:
    """A PostgreSQL database for one module alone (its URL), which its tests may even drop;
    dropped at the end. Several coordinators can share it, as replicas do."""
    name = f"pool_{secrets.token_hex(4)}"
    try:
        asyncio.run(run_sql(f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.fail(f"PostgreSQL is required at {postgres_url()} (set POOL_TEST_POSTGRES_URL): {exc}")
    try:
        yield f"{postgres_url().rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(run_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on both databases."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A coordinator on SQLite with one consumer key and one agent token; agents per test."""
    harness = Pool(tmp_path_factory.mktemp("pool"))
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def _llama_server(workdir: Path, model: Path, name: str, parallel: int, *extra: str) -> Iterator[str]:
    port = localpool.free_port()
    proc = localpool.start_llama(model, port, workdir, name, parallel, "local-model", *extra)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's server with SmolLM2-135M-Instruct (4 slots); its base URL."""
    yield from _llama_server(tmp_path_factory.mktemp("llama"), localpool.smollm2_path(), "llama", 4)


@pytest.fixture(scope="module")
def llama_embed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's server embedding with SmolLM2-135M (mean pooling, 2 slots): the directory's
    ``smollm2-135m-embed``; it serves embeddings only."""
    workdir = tmp_path_factory.mktemp("llama-embed")
    yield from _llama_server(workdir, localpool.smollm2_path(), "llama-embed", 2, "--embeddings", "--pooling", "mean")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's server with Gemma 3 270M (2 slots): a real model other than SmolLM2."""
    workdir = tmp_path_factory.mktemp("gemma")
    yield from _llama_server(workdir, localpool.gemma_path(workdir / "models"), "gemma", 2)


@pytest.fixture(autouse=True)
def _agents_cleanup(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "pool" in request.fixturenames:
        request.getfixturevalue("pool").stop_agents()
