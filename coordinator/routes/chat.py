"""``POST /v1/chat/completions``: OpenAI-compatible, streamed (SSE) or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.response import Stream

from coordinator import catalog
from coordinator.dispatch import Attempt, Job, provider_error
from coordinator.errors import PoolError, error_body, invalid_api_key
from coordinator.state import PoolState
from shared import errors
from shared.backend import Chunk, Done, Failure
from shared.openai import ChatCompletionRequest

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder()

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class XPool(msgspec.Struct, omit_defaults=True):
    provider: int | str
    agent: str | None
    fallback: bool
    latency_ms: int
    ttft_ms: int | None = None


async def require_consumer_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a valid ``pool_live_`` key, checked before the body is read."""
    pool: PoolState = connection.app.state.pool
    principal = await pool.consumer_keys.resolve(connection.headers.get("authorization"))
    if principal is None:
        raise invalid_api_key()
    connection.state.principal = principal


def stamp(payload: bytes, x_pool: XPool) -> bytes:
    """Add ``"x_pool": {…}`` to a JSON object without re-parsing it."""
    body = payload.rstrip()
    if not body.endswith(b"}"):
        return payload
    inner = body[:-1].rstrip()
    separator = b"" if inner.endswith(b"{") else b","
    return inner + separator + b'"x_pool":' + _json.encode(x_pool) + b"}"


def _x_pool(job: Job, started: float, first_at: float | None = None) -> XPool:
    now = time.perf_counter()
    agent = job.agent
    return XPool(
        provider=agent.user_id if agent is not None else "platform",
        agent=agent.agent_id if agent is not None else None,
        fallback=job.fallback,
        latency_ms=round((now - started) * 1000),
        ttft_ms=None if first_at is None else round((first_at - started) * 1000),
    )


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        _json.encode(error_body(status, code, message)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _sse_error(failure: Failure) -> bytes:
    status, code, message = provider_error(failure)
    return b"data: " + _json.encode(error_body(status, code, message)) + b"\n\n"


def _check_model(pool: PoolState, slug: str) -> None:
    if slug in catalog.CATALOG or pool.upstream.serves(slug) or pool.registry.serving(slug):
        return
    raise PoolError(
        404,
        errors.MODEL_NOT_FOUND,
        f"The model `{slug}` does not exist in this pool. GET /v1/models lists the available models.",
        param="model",
    )


@post(
    "/v1/chat/completions",
    guards=[require_consumer_key],
    summary="Create a chat completion",
    description="OpenAI-compatible chat completions, served by a provider agent or the platform upstream.",
    tags=["inference"],
    status_code=200,
)
async def create_chat_completion(request: Request[Any, Any, Any], data: ChatCompletionRequest) -> Response[Any]:
    pool: PoolState = request.app.state.pool
    started = time.perf_counter()
    _check_model(pool, data.model)
    raw = await request.body()
    stream = data.stream
    want_usage = bool(stream and data.stream_options and data.stream_options.include_usage)
    if stream:
        attempt = await pool.dispatcher.start(data.model, raw, stream=True, want_usage=want_usage)
        if attempt is None:
            return _no_capacity(pool, data.model, started)
        if isinstance(attempt.first, Failure):
            return _failed(pool, data.model, attempt.first, attempt.job, started)
        return Stream(
            _relay(pool, data.model, attempt, started),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    return await _complete(pool, data.model, raw, started)


def _no_capacity(pool: PoolState, slug: str, started: float) -> Response[bytes]:
    pool.stats.record(slug, (time.perf_counter() - started) * 1000, fallback=False, ok=False)
    retry_after = pool.settings.no_capacity_retry_after
    return _error_response(
        503,
        errors.NO_CAPACITY,
        f"No provider has capacity for `{slug}` right now. Retry in {retry_after} s.",
        headers={"retry-after": str(retry_after)},
    )


def _failed(pool: PoolState, slug: str, failure: Failure, job: Job, started: float) -> Response[bytes]:
    pool.stats.record(slug, (time.perf_counter() - started) * 1000, fallback=job.fallback, ok=False)
    status, code, message = provider_error(failure)
    return _error_response(status, code, message)


async def _complete(pool: PoolState, slug: str, raw: bytes, started: float) -> Response[Any]:
    """Non-stream: nothing reaches the consumer before the end, so any retryable failure fails over."""
    attempt = await pool.dispatcher.start(slug, raw, stream=False, want_usage=False)
    if attempt is None:
        return _no_capacity(pool, slug, started)
    job, event = attempt.job, attempt.first
    parts: list[bytes] = []
    while True:
        if isinstance(event, Chunk):
            parts.append(event.data)
        elif isinstance(event, Done):
            body = stamp(b"".join(parts), _x_pool(job, started))
            pool.stats.record(slug, (time.perf_counter() - started) * 1000, fallback=job.fallback, ok=True)
            return Response(body, media_type="application/json")
        else:
            job.cancel()
            return _failed(pool, slug, event, job, started)
        event = await job.next(pool.settings.idle_timeout)


async def _relay(pool: PoolState, slug: str, attempt: Attempt, started: float) -> AsyncIterator[bytes]:
    """Relay a started job as SSE; an error after the first chunk ends the stream with an error event."""
    job, event = attempt.job, attempt.first
    first_at = time.perf_counter()
    idle = pool.settings.idle_timeout
    try:
        while True:
            out: list[bytes] = []
            for item in (event, *job.ready()):
                if isinstance(item, Chunk):
                    out.append(b"data: " + item.data + b"\n\n")
                    continue
                if isinstance(item, Done):
                    x_pool = _x_pool(job, started, first_at)
                    tail = list(item.tail)
                    if tail:
                        tail[-1] = stamp(tail[-1], x_pool)
                    out.extend(b"data: " + chunk + b"\n\n" for chunk in tail)
                    out.append(b"data: [DONE]\n\n")
                    pool.stats.record(slug, x_pool.latency_ms, fallback=job.fallback, ok=True)
                else:
                    log.warning("stream failed after first chunk", extra={"job_id": job.job_id, "code": item.code})
                    out.append(_sse_error(item))
                    pool.stats.record(slug, (time.perf_counter() - started) * 1000, fallback=job.fallback, ok=False)
                yield b"".join(out)
                return
            yield b"".join(out)
            event = await job.next(idle)
    finally:
        if not job.finished:
            log.info("consumer went away, cancelling job", extra={"job_id": job.job_id})
            job.cancel()
