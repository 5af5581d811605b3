"""Independent checks of the money invariants, straight from the tables (not through ledger.py)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


async def ledger_problems(engine: AsyncEngine) -> list[str]:
    """Every broken invariant, described; empty when the books are sound:

    - every ledger transaction's entries sum to zero;
    - every stored balance equals the replay (sum) of its account's entries;
    - no wallet, holds or earnings account is negative;
    - each user's ``held`` balance equals what their pending holds still reserve (amount - charged);
    - a resolved hold was never charged more than it held.
    """
    problems: list[str] = []
    async with engine.connect() as conn:
        unbalanced = (
            await conn.execute(
                text("SELECT tx_id, SUM(amount) FROM ledger_entries GROUP BY tx_id HAVING SUM(amount) <> 0")
            )
        ).all()
        problems += [f"transaction {tx} sums to {total}" for tx, total in unbalanced]
        drift = (
            await conn.execute(
                text(
                    "SELECT a.id, a.balance, COALESCE(SUM(e.amount), 0) FROM accounts a "
                    "LEFT JOIN ledger_entries e ON e.account_id = a.id GROUP BY a.id, a.balance "
                    "HAVING a.balance <> COALESCE(SUM(e.amount), 0)"
                )
            )
        ).all()
        problems += [f"account {acc} stores {stored} but its entries sum to {replay}" for acc, stored, replay in drift]
        negative = (
            await conn.execute(
                text("SELECT id, balance FROM accounts WHERE kind IN ('wallet', 'held', 'earnings') AND balance < 0")
            )
        ).all()
        problems += [f"account {acc} is negative: {bal}" for acc, bal in negative]
        held = (
            await conn.execute(
                text(
                    "SELECT a.id, a.balance, COALESCE(SUM(h.amount - h.charged), 0) AS reserved FROM accounts a "
                    "LEFT JOIN holds h ON h.user_id = a.user_id AND h.status = 'pending' "
                    "WHERE a.kind = 'held' GROUP BY a.id, a.balance "
                    "HAVING a.balance <> COALESCE(SUM(h.amount - h.charged), 0)"
                )
            )
        ).all()
        problems += [f"{acc} is {bal} but pending holds sum to {pending}" for acc, bal, pending in held]
        over = (await conn.execute(text("SELECT id, amount, charged FROM holds WHERE charged > amount"))).all()
        problems += [f"hold {hold} charged {charged} over its {amount}" for hold, amount, charged in over]
    return problems


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
