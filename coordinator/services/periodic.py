"""Background work, all of it on one APScheduler: write booked charges and the request log, drop
agents that stopped heartbeating or whose token was revoked, release holds whose request is gone,
reload the model directory and the canary references (edited by any process), write trust evidence
and decay scores, send verification jobs and refund what they discredit, write and prune the status
history, and with replicas share the status windows."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from coordinator.identity import users
from coordinator.market import catalog
from coordinator.market.placement import offer_price
from coordinator.market.upstream import MIN_PROVIDERS, median_price
from coordinator.money import ledger, payments, payouts
from coordinator.money.metering import Price
from coordinator.services import overview
from coordinator.services.payments import PaymentsUnavailable
from coordinator.services.presence import remove_agent
from coordinator.services.state import PoolState
from coordinator.trust import scores as trust
from shared.protocol import CLOSE_REVOKED, CLOSE_STALE

log = logging.getLogger(__name__)
TRUST_INTERVAL = 2.0  # seconds between writes of trust evidence


async def drop_stale_agents(pool: PoolState) -> int:
    """Remove agents silent for longer than the allowed heartbeat misses; fail over their jobs."""
    horizon = time.monotonic() - pool.settings.stale_after
    stale = pool.registry.stale(horizon)
    for agent in stale:
        remove_agent(pool, agent, "missed heartbeats", CLOSE_STALE, evidence=trust.HEARTBEAT_MISSED)
    return len(stale)


async def drop_revoked_agents(pool: PoolState) -> int:
    """Disconnect agents whose token was revoked (on any coordinator process)."""
    agents = pool.registry.local()
    if not agents:
        return 0
    async with pool.db_sessions() as session:
        revoked = await users.revoked_agent_tokens(session, {a.token_id for a in agents})
    return sum(
        remove_agent(pool, agent, "agent token revoked", CLOSE_REVOKED) for agent in agents if agent.token_id in revoked
    )


async def write_charges(pool: PoolState) -> None:
    """Write the charges booked on this process's credit leases; close idle leases."""
    try:
        await pool.leases.flush()
    except Exception as exc:  # the database is away: charges stay booked for the next round
        log.error("ledger flush failed", extra={"error": str(exc)})


async def return_idle_budgets(pool: PoolState) -> None:
    """Give back the spend-cap budget idle keys hold unused, so other processes can use it."""
    try:
        await pool.budgets.flush()
    except Exception as exc:  # the database is away: it stays with us until next time
        log.error("budget flush failed", extra={"error": str(exc)})


async def write_request_log(pool: PoolState) -> None:
    """Write the request log rows waiting in memory (a failed write keeps them for the next round)."""
    await pool.requests.flush()


async def release_orphaned_holds(pool: PoolState) -> None:
    try:
        await pool.leases.sweep()
    except Exception as exc:  # the database is away; try again next time
        log.error("hold sweep failed", extra={"error": str(exc)})


async def price_upstream(pool: PoolState) -> None:
    """Follow each fallback model's pool price (when the operator set none): market/upstream.py."""
    upstream, settings = pool.upstream, pool.settings
    if upstream.fixed is not None:
        return
    default = Price(settings.default_max_price_in, settings.default_max_price_out)
    for slug in upstream.models:
        entry = pool.directory.entries.get(slug)
        ceiling = entry.ceiling(default) if entry is not None else default
        trusted = max(settings.trust_threshold, trust.TRUSTED)
        live = [(a.provider_id, offer_price(a, slug)) for a in pool.registry.able(slug, trusted)]
        upstream.reprice(slug, median_price(live, MIN_PROVIDERS), ceiling)


async def reload_directory(pool: PoolState) -> None:
    try:
        pool.directory = await catalog.load(pool.engine)
    except Exception as exc:  # keep the directory we have
        log.error("directory reload failed", extra={"error": str(exc)})


async def keep_trust(pool: PoolState) -> None:
    """Write new trust evidence, and let time act on the scores of connected agents."""
    await pool.trust.flush(everything=False)
    for agent in pool.registry.local():  # another replica's agents come with the score it keeps
        pool.trust.apply(agent, pool.trust.standing(agent.token_id, agent.user_id))


async def keep_history(pool: PoolState) -> None:
    """Note who is connected, and write this process's open minutes of status history."""
    serving: dict[str, set[int]] = {}
    for agent in pool.registry.local():  # each replica notes its own: the minutes are merged
        for slug in agent.models:
            serving.setdefault(slug, set()).add(agent.user_id)
    pool.history.providers(serving)
    await pool.history.flush()


async def refund_discredited(pool: PoolState) -> None:
    """Give consumers back what they paid for jobs a failed canary discredited."""
    await pool.clawback.refund_due()


async def reload_references(pool: PoolState) -> None:
    """Read canary references and vouched providers again (other processes and the operator edit them)."""
    try:
        await pool.verifier.refresh()
    except Exception as exc:  # keep the references we have
        log.error("reference reload failed", extra={"error": str(exc)})


async def verify_an_agent(pool: PoolState) -> None:
    """Send one verification job (a canary) to the agent verified least so far (none while draining)."""
    if not pool.draining:
        pool.verifier.start_one(pool.directory)


async def share_window(pool: PoolState) -> None:
    await overview.share_window(pool)


async def mature_earnings(pool: PoolState) -> None:
    """Move provider earnings out of escrow once they are ``POOL_PAYOUT_HOLD_DAYS`` old."""
    cutoff = ledger.now() - timedelta(days=pool.settings.payout_hold_days)
    try:
        moved = await payouts.mature(pool.engine, cutoff)
    except Exception:
        log.exception("maturing escrowed earnings failed; the next sweep tries again")
        return
    if moved:
        log.info("earnings matured", extra={"amount_nano": moved})


async def auto_top_up(pool: PoolState) -> None:
    """Charge the automatic top-ups whose balance fell under their threshold, once per crossing."""
    try:
        await payments.rearm(pool.engine)
        for auto in await payments.due(pool.engine):
            await pool.payments.top_up_automatically(auto)
        now = ledger.now()
        for auto in await payments.stalled(pool.engine, now - timedelta(minutes=1), now - timedelta(hours=23)):
            await pool.payments.retry_top_up(auto)
    except Exception:
        log.exception("automatic top-ups failed; the next sweep tries again")


async def retry_transfers(pool: PoolState) -> None:
    """Make the transfers of payouts approved more than a minute ago and still not paid (the process
    that approved them stopped, or the payment provider could not be reached)."""
    for payout_id in await payouts.approved_before(pool.engine, ledger.now() - timedelta(minutes=1)):
        try:
            await pool.payments.transfer(payout_id)
        except (PaymentsUnavailable, payouts.PayoutRefused):
            continue


async def write_offers(pool: PoolState) -> None:
    """Write the offers' spans that opened and ended since the last call."""
    try:
        await pool.offer_log.flush()
    except Exception:
        log.exception("writing offer spans failed; they stay queued")


async def sweep_offers(pool: PoolState) -> None:
    """Renew this process's open offer spans, end dead processes' and prune old ones."""
    try:
        await pool.offer_log.sweep()
    except Exception:
        log.exception("the offer span sweep failed; the next one tries again")


async def refresh_providers(pool: PoolState) -> None:
    """Read the provider profiles other processes changed."""
    try:
        await pool.providers.refresh(pool.engine)
    except Exception:
        log.exception("reading provider profiles failed; the next refresh tries again")


def scheduler(pool: PoolState) -> AsyncIOScheduler:
    sched = AsyncIOScheduler()
    settings = pool.settings
    interval = max(0.2, settings.heartbeat_interval / 2)
    once = {"args": [pool], "max_instances": 1, "coalesce": True}
    sched.add_job(write_charges, "interval", seconds=settings.ledger_flush_interval, **once)
    sched.add_job(write_request_log, "interval", seconds=settings.request_log_interval, **once)
    sched.add_job(return_idle_budgets, "interval", seconds=5.0, **once)
    sched.add_job(drop_stale_agents, "interval", seconds=interval, **once)
    sched.add_job(drop_revoked_agents, "interval", seconds=1.0, **once)
    sweep = min(settings.hold_sweep_interval, settings.instance_lease_seconds / 3)
    sched.add_job(release_orphaned_holds, "interval", seconds=sweep, **once)
    sched.add_job(keep_trust, "interval", seconds=TRUST_INTERVAL, **once)
    sched.add_job(refund_discredited, "interval", seconds=1.0, **once)
    sched.add_job(keep_history, "interval", seconds=settings.status_flush_seconds, **once)
    if pool.replica is not None:
        sched.add_job(share_window, "interval", seconds=1.0, **once)
    if settings.canary_interval_seconds > 0:
        sched.add_job(verify_an_agent, "interval", seconds=settings.canary_interval_seconds, **once)
    sched.add_job(reload_directory, "interval", seconds=settings.directory_reload_seconds, **once)
    sched.add_job(reload_references, "interval", seconds=settings.directory_reload_seconds, **once)
    sched.add_job(price_upstream, "interval", seconds=1.0, **once)
    sched.add_job(write_offers, "interval", seconds=1.0, **once)
    sched.add_job(sweep_offers, "interval", seconds=sweep, **once)
    sched.add_job(refresh_providers, "interval", seconds=settings.provider_refresh_seconds, **once)
    sched.add_job(mature_earnings, "interval", seconds=settings.escrow_sweep_seconds, **once)
    if pool.payments.enabled:
        sched.add_job(retry_transfers, "interval", seconds=60.0, **once)
        sched.add_job(auto_top_up, "interval", seconds=settings.auto_topup_seconds, **once)
    return sched
