"""Behaviour across coordinator processes: revocation reaches another process within a second, and
the request log loses nothing on a clean shutdown."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx

from scripts import localpool
from tests.harness import ADMIN_TOKEN, Pool
from tests.waiting import eventually

BODY = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_a_key_revoked_on_one_process_is_refused_by_another_within_a_second(pg_url: str, tmp_path: Path) -> None:
    first = Pool(tmp_path, db_url=pg_url)
    first.start()
    port = localpool.free_port()
    second = localpool.start_coordinator(port, first.env, tmp_path, name="coordinator-second")
    other = f"http://127.0.0.1:{port}"
    try:
        session = {"authorization": f"Bearer {first.sign_up('two@example.com', 'a long password')['token']}"}
        created = httpx.post(f"{first.url}/v1/tokens", json={"displayName": "shared"}, headers=session, timeout=10)
        assert created.status_code == 201, created.text
        key, key_id = created.json()["token"], created.json()["id"]
        auth = {"authorization": f"Bearer {key}"}
        # The other process knows the key (no agent there: 503, not 401) and caches it.
        for _ in range(3):
            reply = httpx.post(f"{other}/v1/chat/completions", json=BODY, headers=auth, timeout=10)
            assert reply.status_code == 503, reply.text
        revoked = httpx.delete(f"{first.url}/v1/tokens/{key_id}", headers=session, timeout=10)
        assert revoked.status_code == 204
        at = time.monotonic()

        def refused() -> httpx.Response | None:
            reply = httpx.post(f"{other}/v1/chat/completions", json=BODY, headers=auth, timeout=10)
            assert reply.status_code in (401, 503), reply.text  # 503 while the key is still accepted
            return reply if reply.status_code == 401 else None

        reply = eventually(refused, timeout=1.5, interval=0.02)  # else the other process still accepts it
        assert time.monotonic() - at <= 1.2
        assert reply.json()["error"]["code"] == "invalid_api_key"
    finally:
        second.stop()
        first.stop()


def test_request_log_is_flushed_on_shutdown(tmp_path: Path) -> None:
    pool = Pool(tmp_path, request_log_interval="3600")  # only the shutdown flush can write these rows
    pool.start()
    try:
        assert pool.coordinator is not None
        ids = []
        for _ in range(3):
            reply = pool.post(BODY)
            assert reply.status_code == 503  # no agent: still a request to log
            ids.append(reply.headers["x-request-id"])
        topup = httpx.post(
            f"{pool.url}/v1/admin/credits",
            json={"email": "consumer@example.com", "amountUsd": "1"},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}", "idempotency-key": "flush-test"},
            timeout=10,
        )
        assert topup.status_code == 201
        with sqlite3.connect(tmp_path / "pool.db") as db:
            assert db.execute("SELECT COUNT(*) FROM request_log").fetchone()[0] == 0
        assert pool.coordinator.stop() in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
        with sqlite3.connect(tmp_path / "pool.db") as db:
            rows = db.execute("SELECT id, status, error_code, model FROM request_log ORDER BY created_at").fetchall()
        assert rows == [(rid, 503, "no_capacity", "smollm2-135m") for rid in ids]
    finally:
        pool.stop()
