"""Money figures straight from the tables, for tests; the invariants are ``coordinator.money.books``."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from coordinator.money.books import ledger_problems

__all__ = ["balance", "books_of", "ledger_problems", "pending_holds"]


async def balance(engine: AsyncEngine, account: str) -> int:
    async with engine.connect() as conn:
        value = await conn.scalar(text("SELECT balance FROM accounts WHERE id = :id"), {"id": account})
    return int(value or 0)


async def pending_holds(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        value = await conn.scalar(text("SELECT COUNT(*) FROM holds WHERE status = 'pending'"))
    return int(value or 0)


async def books_of(url: str) -> tuple[int, list[str]]:
    """For a database URL: holds still pending, and every broken ledger invariant."""
    engine = create_async_engine(url)
    try:
        return await pending_holds(engine), await ledger_problems(engine)
    finally:
        await engine.dispose()
