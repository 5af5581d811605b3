"""``create_app(settings)``: the coordinator's Litestar application."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from coordinator import __version__, auth, db, periodic
from coordinator.dispatch import Dispatcher
from coordinator.errors import PoolError, error_body
from coordinator.registry import Registry
from coordinator.routes.agent_ws import agent_connect
from coordinator.routes.chat import create_chat_completion
from coordinator.routes.directory import list_models, pool_status
from coordinator.settings import Settings
from coordinator.state import PoolState
from coordinator.stats import RequestStats
from coordinator.upstream import Upstream
from shared import errors, logs

log = logging.getLogger(__name__)
_MISSING = re.compile(r"missing required field `([^`]+)`")
_json = msgspec.json.Encoder()

_CODES = {
    400: errors.INVALID_REQUEST,
    401: errors.INVALID_API_KEY,
    404: errors.NOT_FOUND,
    405: errors.INVALID_REQUEST,
    413: errors.REQUEST_TOO_LARGE,
    429: errors.RATE_LIMIT_EXCEEDED,
}


def _envelope(status: int, code: str, message: str, param: str | None = None, headers: Any = None) -> Response[bytes]:
    return Response(
        _json.encode(error_body(status, code, message, param)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _pool_error(_: Request[Any, Any, Any], exc: PoolError) -> Response[bytes]:
    return _envelope(exc.status, exc.code, exc.message, exc.param, exc.headers)


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
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
    return _envelope(400, errors.INVALID_REQUEST, message, param)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    message = str(exc.detail)
    if status == 413:
        message = "The request body is too large."
    elif status == 400 and ("malformed" in message or "decode" in message.lower()):
        message = f"The request body is not valid JSON: {message}"
    return _envelope(status, _CODES.get(status, errors.INVALID_REQUEST), message, None, exc.headers)


def _internal_error(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error", exc_info=exc)
    return _envelope(500, errors.INTERNAL_ERROR, "Internal error; it has been logged.")


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


@get("/healthz", summary="Liveness and agent count", tags=["ops"])
async def healthz(request: Request[Any, Any, Any]) -> dict[str, Any]:
    pool: PoolState = request.app.state.pool
    return {"status": "ok", "version": __version__, "agents": len(pool.registry)}


def build_state(settings: Settings) -> PoolState:
    engine = db.create_engine(settings.database_url)
    sessions = db.sessionmaker(engine)
    registry = Registry()
    upstream = Upstream(
        settings.upstream_base_url,
        settings.upstream_api_key,
        settings.upstream_models,
        settings.upstream_timeout,
    )
    return PoolState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        consumer_keys=auth.consumer_keys(sessions),
        agent_tokens=auth.agent_tokens(sessions),
        registry=registry,
        upstream=upstream,
        dispatcher=Dispatcher(registry, upstream, settings.first_chunk_timeout, settings.job_deadline),
        stats=RequestStats(settings.status_window_seconds),
    )


def create_app(settings: Settings) -> Litestar:
    pool = build_state(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        sched = periodic.scheduler(pool)
        sched.start()
        try:
            yield
        finally:
            sched.shutdown(wait=False)
            await pool.upstream.aclose()
            await pool.engine.dispose()

    app = Litestar(
        route_handlers=[create_chat_completion, list_models, pool_status, agent_connect, healthz],
        lifespan=[lifespan],
        middleware=[request_id_middleware],
        exception_handlers={
            PoolError: _pool_error,
            ValidationException: _validation_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Provider Pool", version=__version__, path="/schema"),
        logging_config=None,
    )
    app.state.pool = pool
    return app
