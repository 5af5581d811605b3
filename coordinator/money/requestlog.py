"""The request log: one row per consumer request, written in batches off the hot path.

Rows wait in memory until :meth:`RequestLog.flush` inserts them (the ``periodic`` sweeps call it
every ``POOL_REQUEST_LOG_INTERVAL`` seconds); :meth:`RequestLog.close` flushes what is left on
shutdown. A failed flush keeps its rows for the next attempt. Rows never hold prompts or keys, only
ids, counts and amounts.

The flush shares the event loop with the requests, so it writes at most ``batch`` rows at a time,
and on PostgreSQL with ``COPY`` (about 40 µs of CPU a row through an ORM insert, a tenth of that
copied): a flush must not stall the requests around it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.core.models import ApiKey, RequestLogRow

log = logging.getLogger(__name__)
_table = cast(Table, RequestLogRow.__table__)
_keys = cast(Table, ApiKey.__table__)


@dataclass(slots=True)
class RequestRecord:
    """What the log keeps of one request; filled in as the request goes."""

    id: str
    user_id: int | None
    key_id: int | None
    model: str = ""
    stream: bool = False
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    provider_user_id: int | None = None
    agent_id: str | None = None
    fallback: bool = False
    status: int = 0
    error_code: str | None = None
    latency_ms: int = 0
    ttft_ms: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reported_prompt_tokens: int | None = None
    reported_completion_tokens: int | None = None
    usage_capped: bool = False
    cost: int = 0
    provider_earned: int = 0
    platform_fee: int = 0
    upstream_cost: int = 0
    refunded: bool = False
    backend_id: str | None = None  # what the backend said; the consumer saw the pool's id and slug
    backend_model: str | None = None
    project: str | None = None  # the key's policy's label
    end_user: str | None = None  # the request's ``user``
    tags: str | None = None  # the request's ``metadata``, JSON
    dlp: str | None = None  # what data protection found, detector -> count, JSON (never the text)
    agent_token_id: int | None = None  # the served agent's token: whose jobs a failed canary refunds
    kind: str = "chat"  # the API: chat, completion, embedding, responses, messages

    def values(self) -> tuple[object, ...]:
        """The row, in the order of :data:`COLUMNS`."""
        return (*(getattr(self, name) for name in _FIELDS), self.created_at.astimezone(UTC).strftime("%Y-%m-%d"))


_FIELDS = tuple(f.name for f in fields(RequestRecord))
COLUMNS = (*_FIELDS, "day")


async def _write(engine: AsyncEngine, records: list[RequestRecord]) -> None:
    """Insert the rows and stamp each key's last use, in one transaction."""
    rows = [r.values() for r in records]
    used: dict[int, datetime] = {}
    for r in records:
        if r.key_id is not None:
            used[r.key_id] = max(used.get(r.key_id, r.created_at), r.created_at)
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # asyncpg's own transaction: SQLAlchemy's would begin only at its first statement.
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            async with driver.transaction():
                await driver.copy_records_to_table(_table.name, records=rows, columns=COLUMNS)
                if used:
                    await driver.executemany(
                        f"UPDATE {_keys.name} SET last_used_at = $2 WHERE id = $1", sorted(used.items())
                    )
            return
        async with conn.begin():
            await conn.execute(insert(_table), [dict(zip(COLUMNS, row, strict=True)) for row in rows])
            if used:
                await conn.execute(
                    update(_keys).where(_keys.c.id == bindparam("key")).values(last_used_at=bindparam("at")),
                    [{"key": key, "at": at} for key, at in sorted(used.items())],
                )


class RequestLog:
    def __init__(self, engine: AsyncEngine, batch: int = 250, max_pending: int = 200_000) -> None:
        self._engine = engine
        self._batch = batch
        self._max_pending = max_pending
        self._pending: dict[str, RequestRecord] = {}
        self._lock = asyncio.Lock()

    def add(self, record: RequestRecord) -> None:
        if len(self._pending) >= self._max_pending:
            log.error("request log backlog full, dropping the oldest row")
            self._pending.pop(next(iter(self._pending)))
        self._pending[record.id] = record

    @property
    def backlog(self) -> int:
        """Rows waiting to be written."""
        return len(self._pending)

    def unflushed(self, request_id: str) -> RequestRecord | None:
        """A row still waiting in memory (so readers see a request before its flush)."""
        return self._pending.get(request_id)

    async def flush(self) -> int:
        """Write every waiting row, ``batch`` at a time; returns how many were written."""
        written = 0
        while self._pending:
            done = await self._flush_batch()
            if not done:
                break
            written += done
            await asyncio.sleep(0)  # let the requests waiting meanwhile run
        return written

    async def _flush_batch(self) -> int:
        async with self._lock:
            if not self._pending:
                return 0
            records = list(itertools.islice(self._pending.values(), self._batch))
            try:
                await _write(self._engine, records)
            except Exception as exc:
                log.error("request log flush failed, will retry", extra={"rows": len(records), "error": str(exc)})
                return 0
            for r in records:
                if self._pending.get(r.id) is r:
                    del self._pending[r.id]
            return len(records)

    async def close(self) -> None:
        await self.flush()
