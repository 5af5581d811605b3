"""Every offer's span, kept durably: an agent announcing a model at a price opens one, its leaving
ends it (an agent changes a price by announcing again, which is a new connection: a new span; the
same offer announced again within a minute of its end continues the old one).

Spans are queued in memory and written in batches (:meth:`OfferLog.flush`), off the agent's path.
This process renews ``seen_at`` on its open spans at each sweep; a span whose process died is ended
at its last ``seen_at`` by any process's sweep, so a crash leaves no offer open for ever. Ended
spans older than the retention are pruned; open ones are kept however old. Price history
(:mod:`coordinator.status.candles`) and providers' uptime read them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Table, delete, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from coordinator.core.models import OfferSpan
from coordinator.market.registry import ConnectedAgent

log = logging.getLogger(__name__)

_spans = cast(Table, OfferSpan.__table__)
MAX_QUEUED = 100_000  # changes kept for a database that is away; beyond, the oldest are dropped (and logged)
CONTINUES = timedelta(seconds=60)  # an offer announced again this soon after it ended continues its span


@dataclass(frozen=True, slots=True)
class Span:
    """One offer over time (``end`` ``None``: still offered)."""

    user_id: int
    agent_id: str
    model: str
    quantization: str
    price_in: int  # nano-USD per token
    price_out: int
    context_window: int | None
    start: datetime
    end: datetime | None


def now() -> datetime:
    return datetime.now(UTC)


Opened = dict[str, object]  # an offer_spans row to insert
Ended = tuple[str, str, datetime]  # (agent id, model, when)


def _away(exc: DBAPIError) -> bool:
    """Whether the error says the database is out of reach (not that it refuses the change)."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


class OfferLog:
    def __init__(self, engine: AsyncEngine, instance_id: str, *, retention_days: float, lease_seconds: float) -> None:
        self.engine = engine
        self.instance_id = instance_id
        self.retention = timedelta(days=retention_days)
        self.lease = timedelta(seconds=lease_seconds)
        self._queue: list[Opened | Ended] = []  # in the order they happened

    def opened(self, agent: ConnectedAgent, at: datetime | None = None) -> None:
        """A local agent joined: a span per model it offers."""
        at = at or now()
        for slug, offer in agent.models.items():
            self._queue.append(
                {
                    "agent_id": agent.agent_id,
                    "model": slug,
                    "user_id": agent.user_id,
                    "instance_id": self.instance_id,
                    "quantization": offer.quantization,
                    "price_in": offer.price_in,
                    "price_out": offer.price_out,
                    "context_window": offer.context_window,
                    "started_at": at,
                    "ended_at": None,
                    "seen_at": at,
                }
            )
        self._bound()

    def ended(self, agent: ConnectedAgent, at: datetime | None = None) -> None:
        """A local agent left: its spans end."""
        at = at or now()
        self._queue.extend((agent.agent_id, slug, at) for slug in agent.models)
        self._bound()

    def _bound(self) -> None:
        if len(self._queue) > MAX_QUEUED:
            log.warning(
                "offer log queue full; oldest changes dropped", extra={"dropped": len(self._queue) - MAX_QUEUED}
            )
            del self._queue[: len(self._queue) - MAX_QUEUED]

    async def flush(self) -> None:
        """Write what was queued, in order. While the database is away everything stays queued; a
        change the database refuses for good (a value it cannot store) is dropped alone, logged, so
        one bad row never holds up the others."""
        queue, self._queue = self._queue, []
        if not queue:
            return
        try:
            async with self.engine.begin() as conn:
                for event in queue:
                    await _write(conn, event)
        except DBAPIError as exc:
            if _away(exc):
                self._queue[:0] = queue
                raise
            for i, event in enumerate(queue):  # one by one: keep what the database takes
                try:
                    async with self.engine.begin() as conn:
                        await _write(conn, event)
                except DBAPIError as refused:
                    if _away(refused):  # gone meanwhile: this change and the rest wait for it
                        self._queue[:0] = queue[i:]
                        raise
                    log.warning("an offer span change was refused; dropped", extra={"error": type(refused).__name__})
                except (OSError, ConnectionError):
                    self._queue[:0] = queue[i:]
                    raise
        except (OSError, ConnectionError):
            self._queue[:0] = queue
            raise

    async def sweep(self, at: datetime | None = None) -> None:
        """Renew this process's open spans, end those of processes gone longer than the lease, and
        prune spans that ended before the retention."""
        at = at or now()
        async with self.engine.begin() as conn:
            await conn.execute(
                update(_spans)
                .where(_spans.c.instance_id == self.instance_id, _spans.c.ended_at.is_(None))
                .values(seen_at=at)
            )
            await conn.execute(
                update(_spans)
                .where(_spans.c.ended_at.is_(None), _spans.c.seen_at < at - self.lease)
                .values(ended_at=_spans.c.seen_at)
            )
            await conn.execute(delete(_spans).where(_spans.c.ended_at < at - self.retention))

    async def spans(
        self, since: datetime, until: datetime, *, model: str | None = None, user_id: int | None = None
    ) -> list[Span]:
        """Spans that overlap ``[since, until)``, for one model and/or one provider."""
        query = select(_spans).where(
            _spans.c.started_at < until, or_(_spans.c.ended_at.is_(None), _spans.c.ended_at > since)
        )
        if model is not None:
            query = query.where(_spans.c.model == model)
        if user_id is not None:
            query = query.where(_spans.c.user_id == user_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        stale = now() - self.lease  # a span whose process stopped renewing it ends there, as the sweep will
        return [
            Span(
                r.user_id,
                r.agent_id,
                r.model,
                r.quantization,
                r.price_in,
                r.price_out,
                r.context_window,
                r.started_at,
                r.ended_at if r.ended_at is not None or r.seen_at >= stale else r.seen_at,
            )
            for r in rows
        ]


async def _write(conn: AsyncConnection, event: Opened | Ended) -> None:
    """One change. An agent that comes back within :data:`CONTINUES` with the very same offer as a
    span its provider just ended continues that span (a reconnecting agent, or one flapping on
    purpose, costs no new row); otherwise a new span opens."""
    if isinstance(event, tuple):
        agent_id, model, at = event
        await conn.execute(
            update(_spans)
            .where(_spans.c.agent_id == agent_id, _spans.c.model == model, _spans.c.ended_at.is_(None))
            .values(ended_at=at, seen_at=at)
        )
        return
    c = _spans.c
    started = cast(datetime, event["started_at"])
    same = (
        select(c.agent_id)
        .where(
            c.user_id == event["user_id"],
            c.model == event["model"],
            c.quantization == event["quantization"],
            c.price_in == event["price_in"],
            c.price_out == event["price_out"],
            c.context_window.is_not_distinct_from(event["context_window"]),
            c.ended_at >= started - CONTINUES,
            c.ended_at <= started,
        )
        .order_by(c.ended_at.desc())
        .limit(1)
    )
    previous = (await conn.execute(same)).scalar()
    if previous is None:
        await conn.execute(insert(_spans), [event])
        return
    await conn.execute(
        update(_spans)
        .where(c.agent_id == previous, c.model == event["model"])
        .values(agent_id=event["agent_id"], instance_id=event["instance_id"], ended_at=None, seen_at=started)
    )
