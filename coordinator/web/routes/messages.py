"""``POST /v1/messages``: Anthropic's Messages API, run as a chat job (``market/messages_api.py``
translates, :mod:`coordinator.services.translated` runs it). The key comes in ``x-api-key`` (as
Anthropic's clients send it) or ``Authorization: Bearer``; every error on this route, the body's
decoding and the key's check included, is in Anthropic's shape (:func:`anthropic_errors`, which
``create_app`` mounts the route with)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from coordinator.core.errors import PoolError
from coordinator.market import messages_api
from coordinator.market.messages_api import MessagesRequest, MessageStream, ShapeError
from coordinator.services import translated
from coordinator.services.inference import Refusal
from coordinator.services.state import PoolState
from coordinator.web.guards import require_consumer_key
from shared import errors

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_json = msgspec.json.Encoder()
_envelope = msgspec.json.Decoder(dict[str, Any])

Handler = Callable[[Request[Any, Any, Any], Any], Response[Any]]
Handlers = MutableMapping[int | type[Exception], Handler]


def anthropic_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response[bytes]:
    return Response(
        _json.encode(messages_api.error_body(status, message)),
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )


def anthropic_errors(handlers: Handlers) -> Handlers:
    """The app's exception handlers, each answering in Anthropic's error shape: the same status,
    message and headers (``Retry-After``), ``{"type": "error", "error": {"type", "message"}}``."""

    def reshaped(handler: Handler) -> Handler:
        def handle(request: Request[Any, Any, Any], exc: Any) -> Response[Any]:
            response = handler(request, exc)
            try:
                message = str(_envelope.decode(response.content)["error"]["message"])
            except (msgspec.DecodeError, KeyError, TypeError):
                message = "The request failed."
            return anthropic_error(response.status_code or 500, message, response.headers)

        return handle

    return {kind: reshaped(handler) for kind, handler in handlers.items()}


@post(
    "/v1/messages",
    before_request=require_consumer_key,  # runs before the body is parsed, as a guard would
    summary="Create a message (Anthropic Messages API)",
    description=(
        "Anthropic's Messages API over the pool's chat completions: `system`, messages with text, image (base64), "
        "`tool_use` and `tool_result` blocks, tools, `max_tokens`, `stop_sequences` (at most 4), streaming with "
        "Anthropic's events. The key goes in `x-api-key` or `Authorization: Bearer`; errors are in Anthropic's "
        "shape. Held, charged and logged as a chat completion."
    ),
    tags=["inference"],
    status_code=200,
)
async def create_message(request: Request[Any, Any, Any], data: MessagesRequest, pool: PoolState) -> Response[Any]:
    try:
        chat = messages_api.to_chat(data)
    except ShapeError as exc:
        raise PoolError(400, errors.INVALID_REQUEST, exc.message, exc.param) from None
    record = request.state.record
    message_id = "msg_" + record.id.removeprefix("req_")
    try:
        call = await translated.admit(pool, request.state.principal, record, chat)
    except Refusal as refusal:
        return anthropic_error(refusal.status, refusal.message, refusal.headers)
    if not data.stream:
        try:
            body = await translated.reply(
                call, lambda chat: messages_api.from_chat(chat, message_id=message_id, model=record.model)
            )
        except Refusal as refusal:
            return anthropic_error(refusal.status, refusal.message, refusal.headers)
        return Response(_json.encode(body), media_type="application/json", headers=call.limits)
    stream = MessageStream(message_id=message_id, model=record.model)
    events = translated.events(
        call,
        stream.start(),
        stream.feed,
        stream.finish,
        lambda refusal: stream.fail(refusal.status, refusal.message),
    )
    return Stream(
        events,
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **call.limits},
        background=BackgroundTask(call.abandon),
    )
