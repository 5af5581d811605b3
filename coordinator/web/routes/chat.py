"""``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI-compatible, streamed (SSE) or not.

The route keeps HTTP: the body is decoded by Litestar, :mod:`coordinator.services.inference` runs the
request from admission to its outcome, and this module turns what it returns into a JSON reply,
SSE events or an error envelope.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from coordinator.core.errors import error_body, error_response
from coordinator.identity.users import Principal
from coordinator.money.requestlog import RequestRecord
from coordinator.services import inference
from coordinator.services.inference import Call, Ending, Refusal
from coordinator.services.state import PoolState
from coordinator.web.guards import require_consumer_key
from shared import errors
from shared.openai import ChatCompletionRequest, CompletionRequest

_json = msgspec.json.Encoder()

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE = b"data: [DONE]\n\n"


@post(
    "/v1/chat/completions",
    before_request=require_consumer_key,  # runs before the body is parsed, as a guard would
    summary="Create a chat completion",
    description=(
        "OpenAI-compatible chat completions, served by a provider agent or the platform upstream. The worst-case "
        "cost is held from the caller's credits before dispatch (402 `insufficient_credits` if short) and the "
        "actual usage is charged when the request ends."
    ),
    tags=["inference"],
    status_code=200,
)
async def create_chat_completion(
    request: Request[Any, Any, Any], data: ChatCompletionRequest, pool: PoolState
) -> Response[Any]:
    return await _complete(request, data, pool)


@post(
    "/v1/completions",
    before_request=require_consumer_key,
    summary="Create a text completion",
    description=(
        "OpenAI-compatible (legacy) text completions: `prompt` is a string, a list of strings, token ids or lists "
        "of token ids. Served by an agent whose backend serves completions for the model, or the platform "
        "upstream; held, charged and logged as chat completions are. `echo` and `suffix` are not supported."
    ),
    tags=["inference"],
    status_code=200,
)
async def create_completion(request: Request[Any, Any, Any], data: CompletionRequest, pool: PoolState) -> Response[Any]:
    return await _complete(request, data, pool)


async def _complete(
    request: Request[Any, Any, Any], data: ChatCompletionRequest | CompletionRequest, pool: PoolState
) -> Response[Any]:
    principal: Principal = request.state.principal
    record: RequestRecord = request.state.record
    call: Call | None = None
    try:
        call = await inference.admit(pool, principal, record, data, await request.body())
        await call.start()
        if data.stream:
            return Stream(
                _sse(call),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, **call.limits},
                background=BackgroundTask(call.abandon),
            )
        return Response(await call.whole(), media_type="application/json", headers=call.limits)
    except Refusal as refusal:
        return _refused(refusal)
    except BaseException:
        if call is not None:
            call.end(Ending(500, errors.INTERNAL_ERROR))
        raise


def _refused(refusal: Refusal) -> Response[bytes]:
    return error_response(refusal.status, refusal.code, refusal.message, refusal.param, refusal.headers)


async def _sse(call: Call) -> AsyncIterator[bytes]:
    """The stream as SSE events: one write per piece; ``[DONE]`` or an error event at the end."""
    async with contextlib.aclosing(call.relay()) as pieces:
        async for piece in pieces:
            events = b"".join(b"data: " + payload + b"\n\n" for payload in piece.payloads)
            if piece.done:
                events += DONE
            elif piece.error is not None:
                error = piece.error
                events += b"data: " + _json.encode(error_body(error.status, error.code, error.message)) + b"\n\n"
            yield events
