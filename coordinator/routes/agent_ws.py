"""``/v1/agent/connect``: the websocket provider agents dial (protocol in ``shared.protocol``)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from coordinator.catalog import SLUG, Directory, normalize, quantization_label
from coordinator.errors import error_body, invalid_api_key
from coordinator.registry import ConnectedAgent
from coordinator.state import PoolState
from shared import protocol
from shared.protocol import (
    Draining,
    Heartbeat,
    Hello,
    JobChunk,
    JobDone,
    JobFailed,
    Limits,
    Message,
    ModelOffer,
    ProtocolError,
    Reject,
    UnknownMessage,
    Welcome,
)

log = logging.getLogger(__name__)

CLOSE_PROTOCOL_ERROR = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_REVOKED = 4403
CLOSE_STALE = 4408
CLOSE_RATE = 4429
CLOSE_TOO_BIG = 1009
CLOSE_UNSUPPORTED_DATA = 1003

MAX_CONCURRENCY = 1024

_decoder = protocol.agent_decoder()


class SocketLink:
    """Serialized sends on one agent socket."""

    def __init__(self, socket: WebSocket[Any, Any, Any]) -> None:
        self._socket = socket
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, message: Message) -> None:
        frame = protocol.encode(message)
        async with self._lock:
            await self._socket.send({"type": "websocket.send", "bytes": frame, "text": None})

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            async with self._lock:
                await self._socket.close(code=code, reason=reason[:120])
        except Exception as exc:  # already gone
            log.debug("close on a dead socket", extra={"error": str(exc)})


class _RateLimit:
    """Token bucket: ``rate`` messages per second with a burst of one second's worth."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class HelloRefused(Exception):
    """Why a Hello cannot be accepted (sent to the agent, which prints it)."""


def hello_offers(hello: Hello, directory: Directory) -> dict[str, ModelOffer]:
    """The agent's offers by directory slug; :class:`HelloRefused` if the Hello cannot be accepted.

    An offer names its slug, or leaves it empty for the coordinator to find from the backend model
    name through the directory's aliases; either way the model must be in the directory."""
    if hello.protocol != protocol.PROTOCOL_VERSION:
        raise HelloRefused(
            f"protocol version {hello.protocol} is not supported; this coordinator speaks version "
            f"{protocol.PROTOCOL_VERSION}: upgrade pool-agent"
        )
    if not hello.models:
        raise HelloRefused("hello announces no models")
    if not 1 <= hello.max_concurrency <= MAX_CONCURRENCY:
        raise HelloRefused(f"max_concurrency must be between 1 and {MAX_CONCURRENCY}")
    offers: dict[str, ModelOffer] = {}
    for offer in hello.models:
        name = offer.slug or offer.backend_model
        if not offer.backend_model or len(offer.backend_model) > 200:
            raise HelloRefused(f"model {name!r}: backend_model must be 1-200 characters")
        if offer.slug and not SLUG.match(offer.slug):
            raise HelloRefused(f"invalid model slug {offer.slug!r} (lowercase letters, digits, . _ : -)")
        found = directory.resolve(name)
        if found is None:
            raise HelloRefused(directory.unknown(name))
        slug = found[0]
        if slug in offers:
            raise HelloRefused(f"model {slug!r} announced twice")
        if offer.price_in < 0 or offer.price_out < 0:
            raise HelloRefused(f"model {slug!r}: prices must not be negative")
        if offer.context_window is not None and offer.context_window <= 0:
            raise HelloRefused(f"model {slug!r}: context_window must be positive")
        quantization = quantization_label(offer.quantization or normalize(offer.backend_model)[1] or "")
        listed = directory.entries[slug].quantizations
        if quantization and listed and quantization not in listed:
            # A label nobody else announces would have no canary reference to be checked against.
            raise HelloRefused(
                f"model {slug!r}: quantization {quantization!r} is not one the directory lists for it "
                f"({', '.join(listed)}); announce one of those, or ask the operator to add it"
            )
        offers[slug] = msgspec.structs.replace(offer, slug=slug, quantization=quantization)
    return offers


async def _refuse_upgrade(socket: WebSocket[Any, Any, Any]) -> None:
    """Answer the upgrade with a plain 401 (ASGI websocket denial response), or close 4401."""
    await socket.receive()  # websocket.connect
    body = msgspec.json.encode(error_body(401, "invalid_api_key", invalid_api_key().message))
    if "websocket.http.response" in (socket.scope.get("extensions") or {}):
        await socket.send(
            {
                "type": "websocket.http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await socket.send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await socket.send({"type": "websocket.close", "code": CLOSE_UNAUTHORIZED, "reason": "invalid agent token"})


async def _receive_frame(socket: WebSocket[Any, Any, Any]) -> bytes | str | None:
    """The next frame (bytes, or str for a text frame), ``None`` once the peer is gone."""
    try:
        event = await socket.receive()
    except WebSocketDisconnect:
        return None
    if event["type"] == "websocket.disconnect":
        return None
    data: Any = event.get("bytes")
    if data is not None:
        return bytes(data)
    text: Any = event.get("text")
    return str(text or "")


@websocket("/v1/agent/connect")
async def agent_connect(socket: WebSocket[Any, Any, Any]) -> None:
    pool: PoolState = socket.app.state.pool
    principal = await pool.agent_tokens.resolve(socket.headers.get("authorization"))
    if principal is None:
        log.info("agent refused: invalid token", extra={"client": str(socket.client)})
        await _refuse_upgrade(socket)
        return
    await socket.accept()
    link = SocketLink(socket)
    settings = pool.settings
    try:
        frame = await asyncio.wait_for(_receive_frame(socket), settings.hello_timeout)
    except TimeoutError:
        await link.close(CLOSE_PROTOCOL_ERROR, "expected hello")
        return
    if frame is None:
        return
    try:
        hello = _decoder.decode(frame) if isinstance(frame, bytes) else None
    except ProtocolError as exc:
        await link.close(CLOSE_PROTOCOL_ERROR, str(exc))
        return
    if not isinstance(hello, Hello):
        await link.send(Reject(reason="the first message must be a hello frame (msgpack)"))
        await link.close(CLOSE_PROTOCOL_ERROR, "expected hello")
        return
    try:
        offers = hello_offers(hello, pool.directory)
    except HelloRefused as refused:
        log.info("agent rejected", extra={"user_id": principal.user_id, "reason": str(refused)})
        await link.send(Reject(reason=str(refused)))
        await link.close(CLOSE_PROTOCOL_ERROR, "rejected")
        return

    agent = ConnectedAgent(
        agent_id="agt_" + secrets.token_hex(6),
        user_id=principal.user_id,
        token_id=principal.credential_id,
        models=offers,
        max_concurrency=hello.max_concurrency,
        link=link,
        last_seen=time.monotonic(),
    )
    await link.send(
        Welcome(
            agent_id=agent.agent_id,
            heartbeat_interval=settings.heartbeat_interval,
            limits=Limits(settings.max_frame_bytes, settings.max_messages_per_second),
            models={offer.backend_model: slug for slug, offer in offers.items()},
            whole_replies=True,
        )
    )
    pool.trust.apply(agent, (await pool.trust.load(agent.token_id)).score())
    pool.registry.add(agent)
    log.info(
        "agent connected",
        extra={
            "agent_id": agent.agent_id,
            "user_id": agent.user_id,
            "models": sorted(agent.models),
            "trust": round(agent.trust, 1),
        },
    )
    reason = "connection closed"
    try:
        reason = await _serve(pool, agent, link, socket)
    finally:
        if pool.registry.remove(agent.agent_id) is agent:
            pool.dispatcher.agent_lost(agent, reason)
        if not any(other.token_id == agent.token_id for other in pool.registry.agents()):
            pool.trust.forget(agent.token_id)
        log.info("agent disconnected", extra={"agent_id": agent.agent_id, "reason": reason})


async def _serve(pool: PoolState, agent: ConnectedAgent, link: SocketLink, socket: WebSocket[Any, Any, Any]) -> str:
    """Handle frames until the agent goes away; returns why it went."""
    dispatcher = pool.dispatcher
    limit = _RateLimit(pool.settings.max_messages_per_second)
    max_frame = pool.settings.max_frame_bytes
    while True:
        frame = await _receive_frame(socket)
        if frame is None:
            return "connection closed"
        if isinstance(frame, str):
            await link.close(CLOSE_UNSUPPORTED_DATA, "text frames are not supported; send msgpack binary frames")
            return "text frame"
        if len(frame) > max_frame:
            await link.close(CLOSE_TOO_BIG, f"frame larger than {max_frame} bytes")
            return "oversized frame"
        if not limit.allow():
            await link.close(CLOSE_RATE, "message rate exceeded")
            return "message rate exceeded"
        try:
            message = _decoder.decode(frame)
        except ProtocolError as exc:
            log.warning("invalid frame from agent", extra={"agent_id": agent.agent_id, "error": str(exc)})
            await link.close(CLOSE_PROTOCOL_ERROR, str(exc))
            return "protocol error"
        agent.last_seen = time.monotonic()
        match message:
            case JobChunk():
                dispatcher.on_chunk(message)
            case JobDone():
                dispatcher.on_done(message)
            case JobFailed():
                dispatcher.on_failed(message)
            case Heartbeat():
                pass
            case Draining():
                agent.draining = True
                log.info("agent draining", extra={"agent_id": agent.agent_id})
            case UnknownMessage(tag=tag):
                log.warning("unknown message skipped", extra={"agent_id": agent.agent_id, "tag": tag})
            case Hello():
                await link.close(CLOSE_PROTOCOL_ERROR, "hello sent twice")
                return "protocol error"
