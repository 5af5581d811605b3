"""``create_app(settings)``: the coordinator's Litestar application."""

from __future__ import annotations

import gc
import logging
import re
import secrets
import socket
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, Router
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Receive, Scope, Send
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from coordinator import __version__
from coordinator.core import db
from coordinator.core.bodies import TOO_DEEP, PoolRequest
from coordinator.core.cluster import Cluster
from coordinator.core.errors import PoolError, error_response
from coordinator.core.ratelimit import AddressLimits, FailureLimits, KeyLimits, PoolFailureLimits, PoolKeyLimits
from coordinator.core.settings import Settings
from coordinator.core.viewcache import ViewCache
from coordinator.identity import auth
from coordinator.identity.formtokens import FormTokens
from coordinator.identity.portal_tokens import Passwords, SessionTokens
from coordinator.identity.providers import ProviderBook
from coordinator.market import catalog
from coordinator.market.mirror import Mirror
from coordinator.market.registry import Registry
from coordinator.market.upstream import Upstream
from coordinator.money import ledger
from coordinator.money.budgets import KeyBudgets
from coordinator.money.clawback import Clawback, SharedVerdicts, apply_verdict
from coordinator.money.leases import CreditLeases
from coordinator.money.metering import Price
from coordinator.money.requestlog import RequestLog, RequestRecord
from coordinator.services import periodic, revocation
from coordinator.services.payments import Payments
from coordinator.services.state import PoolState, pool_of, provide_pool
from coordinator.serving.dispatch import Dispatcher
from coordinator.serving.relay import Relay
from coordinator.serving.verify import Verifier
from coordinator.status.history import History
from coordinator.status.metrics import Gauges, Metrics
from coordinator.status.offerlog import OfferLog
from coordinator.status.stats import RequestStats
from coordinator.trust import canaries
from coordinator.trust.references import ReferenceBook
from coordinator.trust.scores import TrustBook
from coordinator.web.routes.account import account_router
from coordinator.web.routes.admin import grant_credits
from coordinator.web.routes.agent_ws import agent_connect
from coordinator.web.routes.board import profile_router, public_router
from coordinator.web.routes.chat import create_chat_completion, create_completion
from coordinator.web.routes.console import console_pages
from coordinator.web.routes.directory import list_models, pool_status
from coordinator.web.routes.embeddings import create_embeddings
from coordinator.web.routes.messages import anthropic_errors, create_message
from coordinator.web.routes.ops import healthz, prometheus_metrics, readyz
from coordinator.web.routes.pages import model_page, provider_page, root, status_live, status_page
from coordinator.web.routes.payments import payments_router
from coordinator.web.routes.policies import policy_router
from coordinator.web.routes.portal import agent_tokens_router, login, logout, signup, tokens_router
from coordinator.web.routes.portal_money import portal_money
from coordinator.web.routes.portal_pages import portal_pages
from coordinator.web.routes.provider import provider_agents
from coordinator.web.routes.responses import create_response
from coordinator.web.templating import STATIC, template_config
from shared import errors, logs

log = logging.getLogger(__name__)
_MISSING = re.compile(r"missing required field `([^`]+)`")

_CODES = {
    400: errors.INVALID_REQUEST,
    401: errors.INVALID_API_KEY,
    404: errors.NOT_FOUND,
    405: errors.INVALID_REQUEST,
    413: errors.REQUEST_TOO_LARGE,
    429: errors.RATE_LIMIT_EXCEEDED,
}


def _log_refused(request: Request[Any, Any, Any], status: int, code: str) -> None:
    """Log a chat request that ended in an error before its handler could (bad body, too large)."""
    record: RequestRecord | None = getattr(request.state, "record", None)
    if record is not None and record.status == 0:
        record.status, record.error_code = status, code
        pool = pool_of(request)
        pool.leases.finish(record, None, None)
        pool.metrics.request(record)


def _pool_error(request: Request[Any, Any, Any], exc: PoolError) -> Response[bytes]:
    _log_refused(request, exc.status, exc.code)
    return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)


def _validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    """Turn Litestar's body-decoding errors into the envelope, naming the offending field."""
    message, param = str(exc.detail), None
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra and isinstance(extra[0], dict):
        key = str(extra[0].get("key") or "").replace("[...]", "")
        detail = str(extra[0].get("message", message))
        missing = _MISSING.search(detail)
        if missing:
            param = f"{key}.{missing[1]}" if key and key != "data" else missing[1]
            message = f"Missing required field `{param}`."
        elif key and key != "data":
            param = key
            message = f"Invalid value for `{param}`: {detail}"
        elif detail.startswith("Expected"):
            message = f"The request body must be a JSON object: {detail}"
        else:
            message = "The request body must be a JSON object."
    elif "malformed" in message or "JSON" in message:
        message = f"The request body is not valid JSON: {message}"
    _log_refused(request, 400, errors.INVALID_REQUEST)
    return error_response(400, errors.INVALID_REQUEST, message, param)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    message = str(exc.detail)
    if status == 413:
        message = "The request body is too large."
    elif status == 400 and ("malformed" in message or "decode" in message.lower()):
        message = f"The request body is not valid JSON: {message}"
    code = _CODES.get(status, errors.INVALID_REQUEST)
    _log_refused(request, status, code)
    return error_response(status, code, message, None, exc.headers)


def _too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[bytes]:
    """A recursion limit reached past the body's first decoding (a body read again, a conversion):
    still the client's nesting, so a 400 and one short line, never a traceback."""
    log.warning("request refused: nested too deeply", extra={"path": request.url.path})
    _log_refused(request, 400, errors.INVALID_REQUEST)
    return error_response(400, errors.INVALID_REQUEST, TOO_DEEP)


def _database_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The database is down or unreachable (refused, dropped, gone): a 503 the client can retry,
    not a 500; nothing was charged, and the request's row waits in memory for the database. Other
    driver errors (a broken constraint) are bugs: 500."""
    unreachable = isinstance(exc, (ConnectionError, OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and (exc.connection_invalidated or type(exc) is DBAPIError)
    )
    if not unreachable:
        return _internal_error(request, exc)
    cause = getattr(exc, "orig", None)  # the driver's error: its class and SQLSTATE say what happened
    log.warning(
        "database unavailable",
        extra={
            "error": type(exc).__name__,
            "cause": type(cause).__name__ if cause is not None else None,
            "sqlstate": getattr(cause, "sqlstate", None)
            or getattr(getattr(cause, "__cause__", None), "sqlstate", None),
        },
    )
    _log_refused(request, 503, errors.DATABASE_UNAVAILABLE)
    return error_response(
        503,
        errors.DATABASE_UNAVAILABLE,
        "The pool cannot reach its database right now; retry in a few seconds.",
        None,
        {"retry-after": "2"},
    )


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error", exc_info=exc)
    _log_refused(request, 500, errors.INTERNAL_ERROR)
    return error_response(500, errors.INTERNAL_ERROR, "Internal error; it has been logged.")


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Give every request an id (``x-request-id``), visible in its logs and response."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        rid = "req_" + secrets.token_hex(8)
        token = logs.request_id.set(rid)

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)

    return middleware


async def _request_id_everywhere(message: Any, scope: Scope) -> None:
    """Give a response the middleware never saw (a 404 or 405 from the router) an ``x-request-id``."""
    if message["type"] == "http.response.start":
        headers = message.setdefault("headers", [])
        if not any(name.lower() == b"x-request-id" for name, _ in headers):
            rid = logs.request_id.get() or "req_" + secrets.token_hex(8)
            message["headers"] = [*headers, (b"x-request-id", rid.encode())]


def portal_sessions(settings: Settings) -> SessionTokens:
    secret = settings.jwt_secret
    if secret is None and settings.jwt_jwks_url is None:
        log.warning("POOL_JWT_SECRET is not set: portal sessions end when this process stops")
        secret = secrets.token_urlsafe(32)
    return SessionTokens(
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl=settings.jwt_ttl_seconds,
        secret=secret,
        jwks_url=settings.jwt_jwks_url,
        algorithms=settings.jwt_algorithms,
        leeway=settings.jwt_leeway_seconds,
    )


def _nosniff(response: Response[Any]) -> Response[Any]:
    """Static files are served as what they are, never sniffed into something else."""
    response.headers["x-content-type-options"] = "nosniff"
    return response


def build_state(settings: Settings) -> PoolState:
    engine = db.create_engine(settings.database_url)
    sessions = db.sessionmaker(engine)
    registry = Registry()
    upstream = Upstream(
        settings.upstream_base_url,
        settings.upstream_api_key,
        settings.upstream_models,
        settings.upstream_timeout,
        price=Price(*settings.upstream_price) if settings.upstream_price is not None else None,
        cost=Price(settings.upstream_cost_in, settings.upstream_cost_out),
        kinds=settings.upstream_kinds,
    )
    requests = RequestLog(engine)
    trust_book = TrustBook(engine, settings.trust_half_life, settings.new_agent_concurrency)
    dispatcher = Dispatcher(
        registry,
        upstream,
        settings.first_chunk_timeout,
        settings.job_deadline,
        trust_floor=settings.trust_threshold,
        trust=trust_book,
        whole_reply_silence=settings.whole_reply_silence,
    )
    cluster = Cluster(settings.redis_url, settings.redis_prefix)
    replica = mirror = relay = None
    if settings.redis_url:
        # unique per process: a restarted replica is a new one (its old agents leave the mirrors)
        replica = f"{settings.replica_name or socket.gethostname()}-{secrets.token_hex(2)}"
        relay = Relay(cluster, replica, registry, dispatcher, trust_book)
        mirror = Mirror(cluster, registry, replica, relay.link, dispatcher.agent_lost)
        mirror.on_gone(relay.origin_gone)
    key_limits = PoolKeyLimits(KeyLimits(settings.rate_limit_rpm, settings.rate_limit_tpm), cluster)
    leases = CreditLeases(
        engine,
        requests,
        key_limits,
        fee_bps=settings.fee_bps,
        hold_ttl=settings.hold_ttl,
        instance_lease=settings.instance_lease_seconds,
        chunk=settings.credit_lease,
        idle_seconds=settings.credit_lease_idle_seconds,
    )
    clawback = Clawback(
        engine, leases, confirmations=settings.canary_confirmations, reach=settings.payout_hold_days * 86_400
    )
    verifier = Verifier(
        registry,
        dispatcher,
        trust_book,
        SharedVerdicts(cluster) if settings.redis_url else clawback,
        settings.first_chunk_timeout,
        settings.idle_timeout,
        ReferenceBook(engine),
        prompts=canaries.Prompts(operator=canaries.read_prompts(settings.canary_prompts_file)),
        default_output_tokens=settings.default_output_tokens,
    )
    views = ViewCache(settings.public_cache_seconds)
    metrics = Metrics(
        Gauges(
            agents=lambda: len(registry.local()),
            jobs=dispatcher.table.__len__,
            open_leases=lambda: leases.open_leases,
            flush_lag=leases.flush_lag,
            request_backlog=lambda: requests.backlog,
            redis_errors=lambda: cluster.errors,
            redis_dropped=lambda: cluster.dropped,
            agents_elsewhere=lambda: len(registry) - len(registry.local()),
            jobs_relayed=lambda: relay.relayed if relay is not None else 0,
            views_computed=lambda: views.computations,
        )
    )
    metrics.watch(engine)
    return PoolState(
        settings=settings,
        engine=engine,
        db_sessions=sessions,
        consumer_keys=auth.consumer_keys(sessions),
        agent_tokens=auth.agent_tokens(sessions),
        registry=registry,
        upstream=upstream,
        dispatcher=dispatcher,
        trust=trust_book,
        verifier=verifier,
        clawback=clawback,
        stats=RequestStats(settings.status_window_seconds),
        history=History(engine, leases.instance_id, settings.status_history, settings.status_flush_seconds),
        requests=requests,
        key_limits=key_limits,
        auth_failures=PoolFailureLimits(FailureLimits(settings.auth_failures_per_minute), cluster),
        leases=leases,
        budgets=KeyBudgets(engine),
        portal=portal_sessions(settings),
        passwords=Passwords(),
        signups=AddressLimits(settings.signups_per_hour, 3600.0),
        forms=FormTokens(settings.jwt_secret or secrets.token_urlsafe(32)),
        directory=catalog.Directory(catalog.shipped()),
        metrics=metrics,
        cluster=cluster,
        payments=Payments.of(settings, engine),
        schema_head=db.head_revision(),
        replica=replica,
        mirror=mirror,
        relay=relay,
        providers=ProviderBook(),
        offer_log=OfferLog(
            engine,
            leases.instance_id,
            retention_days=settings.price_history_days,
            lease_seconds=settings.instance_lease_seconds,
        ),
        views=views,
        public_limits=AddressLimits(settings.public_rpm, 60.0),
        public_key_limits=AddressLimits(settings.public_rpm_keyed, 60.0),
    )


# Every error becomes the API's envelope (``/v1/messages`` reshapes these into Anthropic's).
HANDLERS: MutableMapping[int | type[Exception], Any] = {
    PoolError: _pool_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    RecursionError: _too_deep,
    DBAPIError: _database_error,
    ConnectionError: _database_error,
    Exception: _internal_error,
}


def create_app(settings: Settings) -> Litestar:
    pool = build_state(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        leases = pool.leases
        await ledger.renew_instance(pool.engine, leases.instance_id, leases.started_at)
        pool.directory = await catalog.load(pool.engine)
        await periodic.price_upstream(pool)
        if pool.upstream.models and pool.upstream.fixed is None:
            log.warning(
                "the platform upstream has no prices (POOL_UPSTREAM_PRICE_IN/_OUT): fallback requests are charged "
                "each model's pool price, the median of its live offers (one per provider), else its last, else "
                "the directory's ceiling",
                extra={"prices_nano_per_token": {s: [p.input, p.output] for s, p in pool.upstream.pool_prices.items()}},
            )
        await pool.verifier.refresh()
        await pool.providers.refresh(pool.engine)
        pool.cluster.on_push(lambda push: revocation.on_push(pool, push))
        pool.cluster.on_push(pool.auth_failures.on_push)
        pool.cluster.on_push(lambda push: apply_verdict(pool.clawback, push))
        if pool.relay is not None and pool.mirror is not None:
            pool.relay.start()
            pool.mirror.start()
        pool.cluster.start()
        sched = periodic.scheduler(pool)
        sched.start()
        # Everything built so far lives as long as the process: keep it out of the collector's full
        # passes, which otherwise stall the event loop (and every request on it) for 50-130 ms.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            pool.draining = True
            sched.shutdown(wait=False)
            pool.verifier.close()
            await periodic.refund_discredited(pool)
            await leases.close()
            await pool.budgets.flush(everything=True)
            await pool.trust.close()
            await periodic.keep_history(pool)
            for agent in pool.registry.local():  # their offers end with this process
                pool.offer_log.ended(agent)
            await periodic.write_offers(pool)
            await pool.requests.close()
            await pool.upstream.aclose()
            await pool.payments.close()
            pool.passwords.close()
            if pool.mirror is not None:
                await pool.mirror.close()
            await pool.cluster.close()
            await pool.engine.dispose()

    app = Litestar(
        route_handlers=[
            create_chat_completion,
            create_completion,
            create_embeddings,
            create_response,
            # Anthropic's clients read errors in Anthropic's shape: this route's are reshaped.
            Router("/", route_handlers=[create_message], exception_handlers=anthropic_errors(HANDLERS)),
            list_models,
            pool_status,
            agent_connect,
            healthz,
            readyz,
            prometheus_metrics,
            signup,
            login,
            logout,
            tokens_router,
            policy_router,
            agent_tokens_router,
            account_router,
            payments_router,
            public_router,
            profile_router,
            grant_credits,
            provider_agents,
            root,
            status_page,
            status_live,
            model_page,
            provider_page,
            portal_pages,
            portal_money,
            console_pages,
            create_static_files_router(path="/static", directories=[STATIC], after_request=_nosniff),
        ],
        template_config=template_config(),
        lifespan=[lifespan],
        middleware=[request_id_middleware],
        before_send=[_request_id_everywhere],
        dependencies={"pool": Provide(provide_pool, sync_to_thread=False)},
        exception_handlers=HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        request_class=PoolRequest,
        openapi_config=OpenAPIConfig(title="Provider Pool", version=__version__, path="/schema"),
        logging_config=None,
    )
    app.state.pool = pool
    return app
