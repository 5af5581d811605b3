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

from coordinator.core.errors import error_body, invalid_api_key
from coordinator.core.ratelimit import Bucket
from coordinator.market.offers import HelloRefused, hello_offers
from coordinator.market.registry import ConnectedAgent
from coordinator.money.metering import Price
from coordinator.services.presence import remove_agent
from coordinator.services.profiles import ensure_profile
from coordinator.services.state import PoolState
from coordinator.web.guards import client_address
from shared import errors, protocol
from shared.protocol import (
    CLOSE_DRAINING,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_RATE,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_DATA,
    Draining,
    Heartbeat,
    Hello,
    JobChunk,
    JobDone,
    JobFailed,
    JobProgress,
    Limits,
    Message,
    ProtocolError,
    Reject,
    UnknownMessage,
    Welcome,
)

log = logging.getLogger(__name__)


_decoder = protocol.agent_decoder()


class SocketLink:
    """Serialized sends on one agent socket."""

    def __init__(self, socket: WebSocket[Any, Any, Any]) -> None:
        self._socket = socket
        self._lock = asyncio.Lock()
        self.closed = False
        self._closing: asyncio.Future[None] | None = None

    async def send(self, message: Message) -> None:
        frame = protocol.encode(message)
        async with self._lock:
            await self._socket.send({"type": "websocket.send", "bytes": frame, "text": None})

    def close_soon(self, code: int, reason: str) -> None:
        """Close without waiting: a silent peer may never answer the closing handshake. The task
        is kept here until it ends."""
        if not self.closed and self._closing is None:
            self._closing = asyncio.ensure_future(self.close(code, reason))

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            async with self._lock:
                await self._socket.close(code=code, reason=reason[:120])
        except Exception as exc:  # already gone
            log.debug("close on a dead socket", extra={"error": str(exc)})


class LogBudget:
    """Lines one connection may add to the log: ``burst`` at once, then one per ``period`` seconds;
    a peer that sends junk as fast as it can fills no disk."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        self.burst = burst
        self.period = period
        self.left = burst
        self.skipped = 0
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.stamp >= self.period:
            self.left, self.stamp = self.burst, now
        if self.left <= 0:
            self.skipped += 1
            return False
        self.left -= 1
        return True

    def take_skipped(self) -> int:
        """How many lines were skipped since the last one written."""
        skipped, self.skipped = self.skipped, 0
        return skipped


async def _refuse_upgrade(socket: WebSocket[Any, Any, Any], status: int = 401, message: str = "") -> None:
    """Answer the upgrade with a plain HTTP error (ASGI websocket denial response), or close 4401/4429."""
    await socket.receive()  # websocket.connect
    code = errors.INVALID_API_KEY if status == 401 else errors.RATE_LIMIT_EXCEEDED
    body = msgspec.json.encode(error_body(status, code, message or invalid_api_key().message))
    if "websocket.http.response" in (socket.scope.get("extensions") or {}):
        await socket.send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await socket.send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        close = CLOSE_UNAUTHORIZED if status == 401 else CLOSE_RATE
        await socket.send({"type": "websocket.close", "code": close, "reason": "refused"})


async def _reject(link: SocketLink, user_id: int, reason: str) -> None:
    log.info("agent rejected", extra={"user_id": user_id, "reason": reason})
    await link.send(Reject(reason=reason))
    await link.close(CLOSE_PROTOCOL_ERROR, "rejected")


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
async def agent_connect(socket: WebSocket[Any, Any, Any], pool: PoolState) -> None:
    client = client_address(socket)
    wait = pool.auth_failures.blocked(client)
    if wait:
        await _refuse_upgrade(socket, 429, f"Too many failed authentications from this address. Retry in {wait} s.")
        return
    principal = await pool.agent_tokens.resolve(socket.headers.get("authorization"))
    if principal is None:
        pool.auth_failures.failed(client)
        log.info("agent refused: invalid token", extra={"client": client})
        await _refuse_upgrade(socket)
        return
    await socket.accept()
    link = SocketLink(socket)
    if pool.refusing:  # shutting down: it should serve from another coordinator
        await link.close(CLOSE_DRAINING, "coordinator draining: reconnect now")
        return
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
    default_ceiling = Price(settings.default_max_price_in, settings.default_max_price_out)
    try:
        offers = hello_offers(hello, pool.directory, default_ceiling)
    except HelloRefused as refused:
        await _reject(link, principal.user_id, str(refused))
        return

    agent = ConnectedAgent(
        agent_id="agt_" + secrets.token_hex(6),
        user_id=principal.user_id,
        token_id=principal.credential_id,
        models=offers,
        max_concurrency=hello.max_concurrency,
        link=link,
        last_seen=time.monotonic(),
        since=time.time(),
    )
    # Its standing first: an agent whose trust cannot be read is not welcomed.
    pool.trust.apply(agent, await pool.trust.load_standing(agent.token_id, agent.user_id))
    await ensure_profile(pool, agent.user_id)  # a provider is on the price board from its first agent
    connected = pool.registry.of_token(agent.token_id)  # checked and added with no await between
    if connected >= settings.max_connections_per_agent_token:
        await _reject(
            link,
            agent.user_id,
            f"this agent token already has {connected} agents connected (the most one token may have); "
            "stop one, or mint another token for another machine",
        )
        return
    pool.registry.add(agent)
    pool.offer_log.opened(agent)
    reason = "connection closed"
    try:
        await link.send(  # before any job: a lock taken without waiting orders it first
            Welcome(
                agent_id=agent.agent_id,
                heartbeat_interval=settings.heartbeat_interval,
                limits=Limits(settings.max_frame_bytes, settings.max_messages_per_second),
                models={offer.backend_model: slug for slug, offer in offers.items()},
                whole_replies=True,
                progress_interval=settings.whole_reply_silence / 4,
            )
        )
        log.info(
            "agent connected",
            extra={
                "agent_id": agent.agent_id,
                "user_id": agent.user_id,
                "models": sorted(agent.models),
                "trust": round(agent.trust, 1),
            },
        )
        reason = await _serve(pool, agent, link, socket)
    finally:
        remove_agent(pool, agent, reason)  # a no-op if a sweep removed it first


async def _serve(pool: PoolState, agent: ConnectedAgent, link: SocketLink, socket: WebSocket[Any, Any, Any]) -> str:
    """Handle frames until the agent goes away; returns why it went."""
    dispatcher = pool.dispatcher
    limit = Bucket(pool.settings.max_messages_per_second, time.monotonic(), period=1.0)
    lines = LogBudget()
    max_frame = pool.settings.max_frame_bytes
    disagreed = 0  # heartbeats in a row whose in_flight was not the coordinator's count
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
        if not limit.take(time.monotonic()):
            await link.close(CLOSE_RATE, "message rate exceeded")
            return "message rate exceeded"
        try:
            message = _decoder.decode(frame)
        except ProtocolError as exc:
            log.warning("invalid frame from agent", extra={"agent_id": agent.agent_id, "error": str(exc)})
            await link.close(CLOSE_PROTOCOL_ERROR, str(exc))
            return "protocol error"
        agent.last_seen = time.monotonic()
        known = True
        match message:
            case JobChunk():
                known = await dispatcher.on_chunk(agent, message)
            case JobDone():
                known = dispatcher.on_done(agent, message)
            case JobFailed():
                known = dispatcher.on_failed(agent, message)
            case JobProgress():
                known = dispatcher.on_progress(agent, message.job_id)
            case Heartbeat(in_flight=reported):
                # The coordinator's count places jobs (an agent's word can't buy it more); a count
                # that disagrees twice running (one heartbeat may cross a job's end) is logged.
                disagreed = disagreed + 1 if reported != agent.in_flight else 0
                if disagreed == 2 and lines.allow():
                    log.warning(
                        "agent's in_flight disagrees with the coordinator's",
                        extra={"agent_id": agent.agent_id, "reported": reported, "counted": agent.in_flight},
                    )
            case Draining():
                agent.draining = True
                log.info("agent draining", extra={"agent_id": agent.agent_id})
            case UnknownMessage(tag=tag):
                if lines.allow():
                    log.warning(
                        "unknown message skipped",
                        extra={"agent_id": agent.agent_id, "tag": tag[:40], "skipped": lines.take_skipped()},
                    )
            case Hello():
                await link.close(CLOSE_PROTOCOL_ERROR, "hello sent twice")
                return "protocol error"
        if not known and lines.allow():  # a job it does not run, or one already over: skipped
            log.info("frame for a job not this agent's skipped", extra={"agent_id": agent.agent_id})
