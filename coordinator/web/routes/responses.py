"""``POST /v1/responses``: OpenAI's Responses API, run as a chat job (``market/responses_api.py``
translates, :mod:`coordinator.services.translated` runs it). Stored responses are not kept:
``previous_response_id`` is refused with a 400 and ``store`` is accepted and ignored."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from coordinator.core.errors import PoolError, error_response
from coordinator.market import responses_api
from coordinator.market.responses_api import ResponsesRequest, ResponseStream, ShapeError
from coordinator.services import translated
from coordinator.services.inference import Refusal
from coordinator.services.state import PoolState
from coordinator.web.guards import require_consumer_key
from shared import errors

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_json = msgspec.json.Encoder()


@post(
    "/v1/responses",
    before_request=require_consumer_key,  # runs before the body is parsed, as a guard would
    summary="Create a model response (OpenAI Responses API)",
    description=(
        "OpenAI's Responses API over the pool's chat completions: `input` as text or items (messages, function "
        "calls and their outputs), `instructions`, function tools, `max_output_tokens`, `text.format` (JSON "
        "schema), streaming with the Responses events. Held, charged and logged as a chat completion. The pool "
        "stores no responses: `previous_response_id` is refused (send the whole conversation in `input`)."
    ),
    tags=["inference"],
    status_code=200,
)
async def create_response(request: Request[Any, Any, Any], data: ResponsesRequest, pool: PoolState) -> Response[Any]:
    try:
        chat = responses_api.to_chat(data)
    except ShapeError as exc:
        raise PoolError(400, errors.INVALID_REQUEST, exc.message, exc.param) from None
    record = request.state.record
    response_id, created_at = "resp_" + record.id.removeprefix("req_"), int(time.time())
    try:
        call = await translated.admit(pool, request.state.principal, record, chat)
    except Refusal as refusal:
        return error_response(refusal.status, refusal.code, refusal.message, refusal.param, refusal.headers)
    if not data.stream:
        try:
            body = await translated.reply(
                call, lambda chat: responses_api.from_chat(chat, data, response_id=response_id, created_at=created_at)
            )
        except Refusal as refusal:
            return error_response(refusal.status, refusal.code, refusal.message, refusal.param, refusal.headers)
        return Response(_json.encode(body), media_type="application/json", headers=call.limits)
    stream = ResponseStream(data, response_id=response_id, created_at=created_at, model=record.model)
    events = translated.events(
        call,
        stream.start(),
        stream.feed,
        stream.finish,
        lambda refusal: stream.fail(refusal.code, refusal.message),
    )
    return Stream(
        events,
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **call.limits},
        background=BackgroundTask(call.abandon),
    )
