"""PostgreSQL restarted under load, beneath two replicas (a PostgreSQL server of the test's own,
from Debian's binaries, stopped and started again while requests flow): while it is down, requests
are served from memory or refused with a clear ``503 database_unavailable`` (never a 500, never a
hang); afterwards both replicas serve again without a restart, every request that was served is in
the request log once, and the books balance."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from scripts import localpool
from tests.conftest import redis_url
from tests.harness import Pool
from tests.ledger_checks import books_of
from tests.waiting import eventually

MSG = [{"role": "user", "content": "hi"}]


class Postgres:
    """A PostgreSQL server in a directory of its own, on a free port."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            pytest.fail("PostgreSQL's server binaries (Debian's postgresql package) are required")
        self.bin = Path(found[-1]).parent
        # outside pytest's directories, which the postgres user may not enter
        self.root = Path(tempfile.mkdtemp(prefix="pool-test-pg-"))
        self.data = self.root / "data"
        self.port = localpool.free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/pool"
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_postgres:  # the server refuses to run as root
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as_postgres, str(self.bin / tool), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.data / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    async def create_database(self) -> None:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", timeout=5)
        try:
            await conn.execute("CREATE DATABASE pool")
        finally:
            await conn.close()

    async def served_requests(self) -> int:
        conn = await asyncpg.connect(self.url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM request_log WHERE status = 200"))
        finally:
            await conn.close()


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        server.start()
        asyncio.run(server.create_database())
        yield server
    finally:
        with contextlib.suppress(RuntimeError):  # already stopped
            server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def test_a_postgresql_restart_under_load_is_ridden_out(tmp_path: Path, postgres: Postgres, prefix: str) -> None:
    a = Pool(
        tmp_path / "a",
        db_url=postgres.url,
        redis_url=redis_url(),
        redis_prefix=f"{prefix}pg:",
        ledger_flush_interval="0.5",
        request_log_interval="0.5",
    )
    a.start()
    port = localpool.free_port()
    b = localpool.start_coordinator(port, a.env, tmp_path, name="coordinator-b")
    urls = [a.url, f"http://127.0.0.1:{port}"]
    try:
        a.agent(a.standin(), ["smollm2-135m"], max_concurrency=8)
        eventually(lambda: "smollm2-135m" in httpx.get(f"{urls[1]}/v1/models", timeout=5).text, timeout=10)
        outcomes: list[tuple[float, int, str]] = []

        async def load(seconds: float) -> None:
            headers = {"authorization": f"Bearer {a.key}"}
            async with httpx.AsyncClient(timeout=30, headers=headers) as client:
                started = time.monotonic()
                i = 0
                while time.monotonic() - started < seconds:
                    response = await client.post(
                        f"{urls[i % 2]}/v1/chat/completions", json={"model": "smollm2-135m", "messages": MSG}
                    )
                    code = response.json()["error"]["code"] if response.status_code != 200 else ""
                    outcomes.append((time.monotonic() - started, response.status_code, code))
                    i += 1
                    await asyncio.sleep(0.02)

        async def scenario() -> tuple[float, float]:
            task = asyncio.create_task(load(12.0))
            await asyncio.sleep(2.0)
            await asyncio.to_thread(postgres.stop)
            down_at = time.monotonic()
            await asyncio.sleep(3.0)
            await asyncio.to_thread(postgres.start)
            up_at = time.monotonic()
            await task
            return down_at, up_at

        asyncio.run(scenario())
        statuses = {status for _, status, _ in outcomes}
        assert statuses <= {200, 503}, outcomes  # never a 500
        refused = [code for _, status, code in outcomes if status == 503]
        assert set(refused) <= {"database_unavailable"}, refused
        served = sum(1 for _, status, _ in outcomes if status == 200)
        tail = [status for at, status, _ in outcomes if at > 10.0]
        assert tail and set(tail) == {200}, outcomes[-20:]  # both replicas serve again, not restarted
        for url in urls:
            eventually(lambda url=url: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout=10)
        # every request served is logged once (rows waited in memory), the books balance
        eventually(lambda: asyncio.run(postgres.served_requests()) == served, timeout=15, interval=0.5)
        assert asyncio.run(books_of(postgres.url))[1] == []
        print(
            f"\nPostgreSQL stopped for 3 s under load: {len(outcomes)} requests, {served} served, "
            f"{len(refused)} refused with 503 database_unavailable, none failed otherwise"
        )
    finally:
        b.stop()
        a.stop()
