"""What operators and load balancers read from a real coordinator process on PostgreSQL:
``/healthz``, ``/readyz`` (database, migrations, draining) and ``/metrics`` (Prometheus text).

The pool gets a database of its own (``own_database``), so the last test can take it away (``DROP DATABASE … FORCE``
ends every connection) and see readiness fail while the process stays alive."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scripts import localpool
from tests.conftest import run_sql
from tests.harness import Pool

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, own_database: str) -> Iterator[Pool]:
    harness = Pool(tmp_path_factory.mktemp("ops"), db_url=own_database)
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def scrape(pool: Pool) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed: (sample name, sorted labels) -> value."""
    response = httpx.get(f"{pool.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_healthz_and_readyz_on_a_healthy_pool(pool: Pool) -> None:
    health = httpx.get(f"{pool.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = httpx.get(f"{pool.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    checks = {"database": "ok", "migrations": "ok", "draining": "no", "redis": "off"}
    assert ready.json() == {"ready": True, "checks": checks}
    paths = httpx.get(f"{pool.url}/schema/openapi.json", timeout=10).json()["paths"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)


def test_metrics_count_requests_by_model_status_and_fallback(pool: Pool) -> None:
    before = scrape(pool)
    pool.agent(pool.standin(chunks=3), ["smollm2-135m"])
    try:
        assert pool.post({"model": "smollm2-135m", "messages": MSG}).status_code == 200
        streamed = pool.post({"model": "smollm2-135m", "messages": MSG, "stream": True})
        assert streamed.status_code == 200
        for garbage in ("no-such-model-1", "no-such-model-2"):  # unknown names never become labels
            assert pool.post({"model": garbage, "messages": MSG}).status_code == 404
        after = scrape(pool)
    finally:
        pool.stop_agents()
        pool.wait_agent_count(0)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("pool_requests_total", model="smollm2-135m", status="200", fallback="false") == 2
    assert grew("pool_requests_total", model="other", status="404", fallback="false") == 2
    assert not any("no-such-model" in str(labels) for _, labels in after)
    assert grew("pool_request_duration_seconds_count", model="smollm2-135m", fallback="false") == 2
    assert grew("pool_time_to_first_token_seconds_count", model="smollm2-135m", fallback="false") == 1  # the stream
    assert after[("pool_agents_connected", ())] == 1
    assert after[("pool_jobs_in_flight", ())] == 0
    assert ("process_cpu_seconds_total", ()) in after  # CPU per request on each replica comes from here
    for gauge in ("pool_credit_leases_open", "pool_ledger_flush_lag_seconds", "pool_request_log_backlog"):
        assert after[(gauge, ())] >= 0


def test_readyz_fails_while_the_schema_is_behind_the_code(pool: Pool, own_database: str) -> None:
    dsn = own_database.replace("postgresql+asyncpg://", "postgresql://")
    head = asyncio.run(_fetch("SELECT version_num FROM alembic_version", dsn))
    asyncio.run(run_sql("UPDATE alembic_version SET version_num = '0001'", dsn))
    try:
        ready = httpx.get(f"{pool.url}/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["migrations"] == f"at 0001, this code needs {head}"
    finally:
        asyncio.run(run_sql(f"UPDATE alembic_version SET version_num = '{head}'", dsn))
    assert httpx.get(f"{pool.url}/readyz", timeout=10).status_code == 200


def test_readyz_fails_when_the_database_is_gone_and_metrics_count_the_errors(pool: Pool, own_database: str) -> None:
    """Requests that need the database get a 503 to retry, not a 500."""
    errors_before = scrape(pool).get(("pool_database_errors_total", ()), 0.0)
    unseen = localpool.admin(pool.env, "create-key", "--email", "consumer@example.com")  # never cached
    name = own_database.rsplit("/", 1)[1]
    asyncio.run(run_sql(f"DROP DATABASE {name} WITH (FORCE)"))
    ready = httpx.get(f"{pool.url}/readyz", timeout=10)
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["database"] not in ("ok", "") and checks["migrations"] == "unknown", checks
    assert "postgres" not in ready.text.lower()  # the driver's message stays in the log
    assert httpx.get(f"{pool.url}/healthz", timeout=10).status_code == 200  # alive, just not ready
    refused = pool.post({"model": "smollm2-135m", "messages": MSG}, key=unseen)  # a key to look up
    assert refused.status_code == 503, refused.text  # one the client may retry, not a 500
    assert refused.json()["error"]["code"] == "database_unavailable" and refused.headers["retry-after"] == "2"
    assert scrape(pool)[("pool_database_errors_total", ())] > errors_before


async def _fetch(query: str, dsn: str) -> str:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return str(await conn.fetchval(query))
    finally:
        await conn.close()
