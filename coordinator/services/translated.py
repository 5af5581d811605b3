"""Requests in other API shapes (OpenAI's Responses, Anthropic's Messages) run as chat jobs.

The route's shape module (``market/responses_api.py``, ``market/messages_api.py``) turns the
request into a chat body; :func:`admit` checks that body as the chat route checks its own and
admits it (:func:`coordinator.services.inference.admit`: policies, holds, placement, billing and
the log are the chat path's, the log row saying which API it came through); the reply comes back
as the chat reply the consumer would have seen (the pool's id and slug, ``x_pool``), decoded for
the shape module to translate, whole (:func:`reply`) or chunk by chunk (:func:`events`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from coordinator.core.errors import PoolError
from coordinator.identity.users import Principal
from coordinator.money.requestlog import RequestRecord
from coordinator.services import inference
from coordinator.services.inference import Call, Refusal
from coordinator.services.state import PoolState
from shared import errors
from shared.openai import ChatCompletionRequest

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()
_chat = msgspec.json.Decoder(ChatCompletionRequest)
_object = msgspec.json.Decoder(dict[str, Any])

Feed = Callable[[dict[str, Any]], list[bytes]]


async def admit(pool: PoolState, principal: Principal, record: RequestRecord, chat: dict[str, Any]) -> Call:
    """Admit the chat body a request of another API became (the log row's ``kind`` already names
    the API: ``web/guards.API_KINDS``), and start it: the :class:`Call` whose output began,
    :class:`Refusal` if it could not, or :class:`PoolError` (400) for a body the chat API refuses."""
    raw = _json.encode(chat)
    try:
        data = _chat.decode(raw)
    except msgspec.ValidationError as exc:
        raise PoolError(400, errors.INVALID_REQUEST, f"The request cannot run as a chat: {exc}") from None
    call = await inference.admit(pool, principal, record, data, raw)
    try:
        await call.start()
    except Refusal:
        raise
    except BaseException:
        call.end(inference.Ending(500, errors.INTERNAL_ERROR))
        raise
    return call


async def reply(call: Call, translate: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The whole reply in the shape ``translate`` makes of the chat reply the consumer would see,
    with its ``x_pool``. A reply that cannot be translated fails the job before anyone pays for it
    (the agent's failure, as an unusable reply is); :class:`Refusal` then, as for any failure."""
    translated: list[dict[str, Any]] = []

    def unusable(body: bytes) -> str | None:
        try:
            translated.append(translate(_object.decode(call.show(body))))
        except (msgspec.MsgspecError, TypeError, KeyError, AttributeError, ValueError, IndexError) as exc:
            return f"not a chat completion ({type(exc).__name__})"
        return None

    try:
        _, x_pool = await call.reply(unusable)
    except Refusal:
        raise
    except BaseException:
        call.end(inference.Ending(500, errors.INTERNAL_ERROR))
        raise
    shown = translated[0]
    shown["x_pool"] = msgspec.to_builtins(x_pool)
    return shown


def _safely(make: Callable[[], list[bytes]]) -> list[bytes]:
    """The events ``make`` gives, or none for a chunk it cannot read: an agent's malformed chunk
    (the audit already judged the output) must not end the consumer's stream from here."""
    try:
        return make()
    except (msgspec.MsgspecError, TypeError, KeyError, AttributeError, ValueError, IndexError):
        log.warning("a chunk could not be translated", extra={"error": "malformed chunk"})
        return []


async def events(
    call: Call,
    start: list[bytes],
    feed: Feed,
    finish: Callable[[], list[bytes]],
    fail: Callable[[Refusal], list[bytes]],
) -> AsyncIterator[bytes]:
    """The stream in the shape's events: ``start``'s first, then ``feed``'s for each chat chunk,
    then ``finish``'s, or ``fail``'s when the job failed after output began. One write per piece
    of the chat stream, as the chat route's."""
    yield b"".join(start)
    async with contextlib.aclosing(call.relay()) as pieces:
        async for piece in pieces:
            out: list[bytes] = []
            for payload in piece.payloads:
                try:
                    chunk = _object.decode(payload)
                except msgspec.DecodeError:  # the audit already counted it; nothing to translate
                    continue
                out += _safely(lambda chunk=chunk: feed(chunk))  # type: ignore[misc]
            if piece.done:
                out += _safely(finish)
            elif piece.error is not None:
                out += fail(piece.error)
            if out:
                yield b"".join(out)
