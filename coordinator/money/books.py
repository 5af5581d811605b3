"""The ledger's invariants, checked straight from the tables (SQL of its own, not through
``ledger.py``): the operator console's health panel and every money test run them."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


async def ledger_problems(engine: AsyncEngine) -> list[str]:
    """Every broken invariant, described; empty when the books are sound:

    - every ledger transaction's entries sum to zero;
    - every stored balance equals the replay (sum) of its account's entries;
    - no wallet, holds, earnings, escrow or pending-payout account is negative, no debt positive;
    - each user's ``held`` balance equals what their pending holds still reserve (amount - charged);
    - a resolved hold was never charged more than it held;
    - no user has credit in the wallet and a debt at once (every credit pays the debt first);
    - each user's pending payouts balance equals their requested and approved payouts, and the
      platform's paid-out account the payouts paid.
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
                text(
                    "SELECT id, balance FROM accounts WHERE "
                    "(kind IN ('wallet', 'held', 'earnings', 'escrow', 'payout') AND balance < 0) "
                    "OR (kind = 'debt' AND balance > 0)"
                )
            )
        ).all()
        problems += [f"account {acc} has the wrong sign: {bal}" for acc, bal in negative]
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
        both = (
            await conn.execute(
                text(
                    "SELECT w.user_id, w.balance, d.balance FROM accounts w "
                    "JOIN accounts d ON d.user_id = w.user_id AND d.kind = 'debt' "
                    "WHERE w.kind = 'wallet' AND w.balance > 0 AND d.balance < 0"
                )
            )
        ).all()
        problems += [f"user {user} has {bal} in the wallet and owes {-owed}" for user, bal, owed in both]
        pending = (
            await conn.execute(
                text(
                    "SELECT a.id, a.balance, COALESCE(SUM(p.amount), 0) FROM accounts a "
                    "LEFT JOIN payouts p ON p.user_id = a.user_id AND p.status IN ('requested', 'approved') "
                    "WHERE a.kind = 'payout' GROUP BY a.id, a.balance "
                    "HAVING a.balance <> COALESCE(SUM(p.amount), 0)"
                )
            )
        ).all()
        problems += [f"{acc} is {bal} but open payouts sum to {due}" for acc, bal, due in pending]
        paid_out = (
            await conn.execute(
                text(
                    "SELECT a.balance, (SELECT COALESCE(SUM(amount), 0) FROM payouts WHERE status = 'paid') "
                    "FROM accounts a WHERE a.id = 'platform:payouts'"
                )
            )
        ).first()
        if paid_out is not None and paid_out[0] != paid_out[1]:
            problems.append(f"platform:payouts is {paid_out[0]} but paid payouts sum to {paid_out[1]}")
    return problems
