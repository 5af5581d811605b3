"""Storage on both databases: migrations, accounts, secret lookup and revocation."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.resources import files

import msgspec
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text, update

from coordinator.core import db
from coordinator.core.models import AgentToken, ApiKey, Base
from coordinator.identity import auth, keys, users
from coordinator.market import catalog
from coordinator.trust import scores as trust
from scripts.localpool import ROOT

HEAD = ScriptDirectory(str(files("migrations"))).get_current_head()


async def test_migrations_create_schema_and_are_idempotent(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        assert await db.current_revision(engine) is None
        await db.migrate(engine)
        await db.migrate(engine)  # every `serve` runs it again
        assert await db.current_revision(engine) == HEAD
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
            # The migrations build exactly what the models describe.
            drift = await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
        assert {
            "users",
            "api_keys",
            "agent_tokens",
            "accounts",
            "ledger_entries",
            "holds",
            "request_log",
            "directory_models",
            "trust_evidence",
            "status_minutes",
            "revoked_sessions",
            "canary_references",
        } <= tables
        assert drift == []
    finally:
        await engine.dispose()


async def test_upgrade_opens_accounts_for_existing_users(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.upgrade(db._alembic_config(sync), "0001"))
            await conn.execute(
                text("INSERT INTO users (email, created_at) VALUES ('old@example.com', :t)"),
                {"t": datetime(2026, 1, 1, tzinfo=UTC)},
            )
        await db.migrate(engine)
        async with engine.connect() as conn:
            ids = set((await conn.execute(text("SELECT id FROM accounts"))).scalars())
        assert {"wallet:1", "held:1", "earnings:1", "platform:fees", "platform:upstream", "platform:funding"} <= ids
    finally:
        await engine.dispose()


async def test_upgrade_keeps_existing_users_able_to_log_in(db_url: str) -> None:
    """0007 adds signup approval: accounts made before it stay usable."""
    engine = db.create_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.upgrade(db._alembic_config(sync), "0006"))
            await conn.execute(
                text("INSERT INTO users (email, created_at) VALUES ('old@example.com', :t)"),
                {"t": datetime(2026, 1, 1, tzinfo=UTC)},
            )
        await db.migrate(engine)
        async with engine.connect() as conn:
            approved = (await conn.execute(text("SELECT approved FROM users"))).scalars().all()
            revoked = (await conn.execute(text("SELECT COUNT(*) FROM revoked_sessions"))).scalar()
        assert approved == [True] and revoked == 0
    finally:
        await engine.dispose()


async def test_accounts_store_only_digests_and_resolve(db_url: str) -> None:
    engine = db.create_engine(db_url)
    await db.migrate(engine)
    sessions = db.sessionmaker(engine)
    try:
        async with sessions() as session, session.begin():
            user = await users.create_user(session, "Dev@Example.com")
            key = await users.create_api_key(session, "dev@example.com", "laptop")
            token = await users.create_agent_token(session, "dev@example.com", "gpu")
        async with sessions() as session:
            stored = (await session.get(ApiKey, 1)) or pytest.fail("key not stored")
            assert stored.digest == keys.digest(key) and key not in (stored.prefix, stored.digest)
            assert stored.prefix == key[:16] and stored.user_id == user.id

        now = [1000.0]
        consumer = auth.SecretCache(sessions, keys.CONSUMER_PREFIX, users.find_api_key, ttl=0.2, clock=lambda: now[0])
        agents = auth.agent_tokens(sessions)
        principal = await consumer.resolve(f"Bearer {key}")
        assert principal is not None and principal.user_id == user.id
        assert await consumer.resolve(f"Bearer {token}") is None  # a token is not a key
        assert (await agents.resolve(f"Bearer {token}")) is not None
        assert await agents.resolve(f"Bearer {key}") is None
        assert await consumer.resolve(f"Basic {key}") is None
        assert await consumer.resolve(None) is None
        forged = keys.generate(keys.CONSUMER_PREFIX)  # well-formed but unknown
        assert await consumer.resolve(f"Bearer {forged}") is None

        async with sessions() as session, session.begin():
            await session.execute(update(ApiKey).values(revoked_at=datetime.now(UTC)))
            await session.execute(update(AgentToken).values(revoked_at=datetime.now(UTC)))
        assert await consumer.resolve(f"Bearer {key}") is not None  # within the TTL: still the cached answer
        now[0] += 0.25  # past the cache TTL: revocation is visible
        assert await consumer.resolve(f"Bearer {key}") is None
        assert await auth.agent_tokens(sessions).resolve(f"Bearer {token}") is None
    finally:
        await engine.dispose()


async def test_account_errors(db_url: str) -> None:
    engine = db.create_engine(db_url)
    await db.migrate(engine)
    try:
        async with db.sessionmaker(engine)() as session:
            await users.create_user(session, "a@example.com")
            await session.commit()
            with pytest.raises(users.AccountError, match="already exists"):
                await users.create_user(session, "A@example.com")
            await session.rollback()
            with pytest.raises(users.AccountError, match="no user"):
                await users.create_api_key(session, "nobody@example.com")
            with pytest.raises(users.AccountError, match="not an email"):
                await users.create_user(session, "not-an-email")
    finally:
        await engine.dispose()


def test_admin_cli_prints_only_the_secret(db_url: str) -> None:
    env = {"POOL_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "coordinator", *args], env=env, cwd=ROOT, capture_output=True, text=True, check=False
        )

    assert run("migrate").returncode == 0
    assert run("admin", "create-user", "--email", "cli@example.com").returncode == 0
    key = run("admin", "create-key", "--email", "cli@example.com", "--name", "k")
    token = run("admin", "create-agent-token", "--email", "cli@example.com")
    assert key.returncode == 0 and keys.is_well_formed(key.stdout.strip(), keys.CONSUMER_PREFIX)
    assert key.stdout.count("\n") == 1
    assert token.returncode == 0 and keys.is_well_formed(token.stdout.strip(), keys.AGENT_PREFIX)
    assert key.stdout.strip() not in key.stderr  # the secret is not logged
    missing = run("admin", "create-key", "--email", "ghost@example.com")
    assert missing.returncode == 1 and "no user" in missing.stderr and missing.stdout == ""


async def test_directory_edits_are_stored_and_merged_over_the_shipped_catalog(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        tiny = catalog.ModelInfo(slug="tiny-1m", display_name="Tiny", family="tiny", aliases=("org/Tiny-1M",))
        async with engine.begin() as conn:
            await catalog.save(conn, tiny)
            await catalog.save(conn, msgspec.structs.replace(tiny, display_name="Tiny 1M"))  # replaces
            await catalog.remove(conn, "gemma-3-270m")
        directory = await catalog.load(engine)
        assert directory.get("tiny-1m") == msgspec.structs.replace(tiny, display_name="Tiny 1M")
        assert directory.resolve("org/Tiny-1M") == ("tiny-1m", None)
        assert directory.get("gemma-3-270m") is None and directory.get("smollm2-135m") is not None
        async with engine.begin() as conn:
            with pytest.raises(catalog.DirectoryError):
                await catalog.save(conn, msgspec.structs.replace(tiny, slug="", display_name="x"))
    finally:
        await engine.dispose()


async def test_trust_evidence_is_stored_and_scores_follow_a_token_across_processes(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        async with db.sessionmaker(engine)() as session, session.begin():
            user = await users.create_user(session, "p@example.com")
            await users.create_agent_token(session, "p@example.com")
        async with engine.connect() as conn:
            token_id = (await conn.execute(text("SELECT id FROM agent_tokens"))).scalar_one()
        book = trust.TrustBook(engine, half_life=3600.0, new_agent_concurrency=2)
        assert (await book.load(token_id)).score() == 50.0
        now = time.time()
        for _ in range(5):
            book.record(trust.Evidence(token_id, user.id, trust.COMPLETED, now))
        book.record(trust.Evidence(token_id, user.id, trust.STALLED, now, detail="no output for 2 s", job_id="job_1"))
        # a minute's completed jobs wait to be merged; the finding is written at once
        assert await book.flush(everything=False) == 1
        assert await book.flush() == 1
        async with engine.connect() as conn:
            query = text("SELECT kind, count, detail, job_id FROM trust_evidence ORDER BY id")
            rows = [tuple(row) for row in (await conn.execute(query)).all()]
        assert rows == [("stalled", 1, "no output for 2 s", "job_1"), ("completed", 5, "", None)]
        # another process (a fresh book) reads the same score from the rows
        expected = book.score(token_id)
        assert (await trust.TrustBook(engine, 3600.0, 2).load(token_id)).score() == pytest.approx(expected, abs=0.01)
        assert expected == pytest.approx(100 * 8 / (8 + 9), abs=0.01)
    finally:
        await engine.dispose()


async def test_a_providers_new_token_starts_from_the_providers_standing(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        async with db.sessionmaker(engine)() as session, session.begin():
            cheat = await users.create_user(session, "cheat@example.com")
            await users.create_user(session, "other@example.com")
            for email in ("cheat@example.com", "cheat@example.com", "other@example.com"):
                await users.create_agent_token(session, email)
        async with engine.connect() as conn:
            caught, fresh, unrelated = (await conn.execute(text("SELECT id FROM agent_tokens ORDER BY id"))).scalars()
            (other,) = (await conn.execute(text("SELECT id FROM users WHERE email = 'other@example.com'"))).scalars()
        book = trust.TrustBook(engine, half_life=3600.0, new_agent_concurrency=2)
        assert await book.load_standing(caught, cheat.id) == 50.0
        now = time.time()
        for _ in range(2):
            book.record(trust.Evidence(caught, cheat.id, trust.CANARY_FAILED, now))
        await book.flush()
        # Another process, after the caught agent is gone: the provider's new token is no newcomer.
        later = trust.TrustBook(engine, half_life=3600.0, new_agent_concurrency=2)
        standing = await later.load_standing(fresh, cheat.id)
        assert later.score(fresh) == 50.0
        assert standing == pytest.approx(100 * 3 / (3 + 3 + 20), abs=0.01)
        assert standing < 40
        assert await later.load_standing(unrelated, other) == 50.0  # other providers are untouched
        later.forget(fresh)
        assert cheat.id not in later.providers
    finally:
        await engine.dispose()
