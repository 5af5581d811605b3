"""Alembic environment: runs on a connection handed in by ``coordinator.core.db.migrate`` or, from the
``alembic`` command line, on an async engine built from ``POOL_DATABASE_URL``."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from coordinator.core.models import Base
from coordinator.core.settings import Settings

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
elif context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `pool-coordinator migrate`")
else:
    url = context.config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
    asyncio.run(_run_from_url(url))
