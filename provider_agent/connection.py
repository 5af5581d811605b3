"""The agent's link to the coordinator: dial, hello/welcome, heartbeats, receive loop, reconnects.

Exceptions:
  Rejected      the coordinator refused this agent (bad token, incompatible protocol): do not retry
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from provider_agent import __version__
from provider_agent.backends import Backend
from provider_agent.config import AgentConfig
from provider_agent.runner import Runner
from shared import protocol
from shared.protocol import (
    CHAT,
    CLOSE_DRAINING,
    Draining,
    Heartbeat,
    Hello,
    JobAssign,
    JobCancel,
    Message,
    ModelOffer,
    ProtocolError,
    Reject,
    UnknownMessage,
    Welcome,
)

log = logging.getLogger(__name__)

_decoder = protocol.coordinator_decoder()


class OlderCoordinator(Exception):
    """The coordinator refused this protocol version: it is older than this agent."""


class Rejected(Exception):
    """The coordinator refused this agent; retrying would not help."""


def backoff_delay(attempt: int, minimum: float, maximum: float) -> float:
    """Exponential backoff with full jitter: uniform in [minimum/2, min(maximum, minimum·2^attempt)]."""
    ceiling = min(maximum, minimum * (2 ** min(attempt, 30)))
    return random.uniform(minimum / 2, max(minimum / 2, ceiling))


class Agent:
    def __init__(self, config: AgentConfig, backend: Backend, kinds: dict[str, list[str]] | None = None) -> None:
        self.config = config
        self.backend = backend
        self.kinds = kinds or {}  # backend model -> the job kinds announced for it (none named: chat)
        # 1 after a coordinator refused this one (an older one), until that connection ends: the next
        # one tries the agent's own again (the coordinator may have been upgraded meanwhile)
        self.protocol = protocol.PROTOCOL_VERSION
        self._older_welcomed = False
        self.runner = Runner(backend, config.max_concurrency)
        self.stopping = asyncio.Event()
        self._ws: ClientConnection | None = None
        self.drained = False  # the last connection ended because its coordinator is shutting down
        self._send_lock = asyncio.Lock()

    def hello(self) -> Hello:
        """The hello to send. To a coordinator of protocol 1 (older than job kinds), only the models
        served for chat, announced as version 1 did: without kinds."""
        c = self.config
        offers = []
        for m in c.models:
            kinds = self.kinds.get(m.backend_model) or [CHAT]
            if self.protocol == 1 and CHAT not in kinds:
                continue
            announced = [] if self.protocol == 1 or kinds == [CHAT] else kinds
            offers.append(
                ModelOffer(m.slug, m.backend_model, c.price_in, c.price_out, c.context_window, kinds=announced)
            )
        if not offers:
            raise Rejected(
                "the coordinator speaks protocol version 1, which serves chat only, and no model here serves chat"
            )
        return Hello(
            protocol=self.protocol, agent_version=__version__, models=offers, max_concurrency=c.max_concurrency
        )

    async def send(self, message: Message) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected to the coordinator")
        frame = protocol.encode(message)
        async with self._send_lock:
            await ws.send(frame)

    def request_stop(self) -> None:
        """SIGTERM: take no new jobs, tell the coordinator, finish in-flight jobs, then exit."""
        if self.stopping.is_set():
            log.warning("second stop signal: cancelling in-flight jobs")
            self.runner.cancel_all()
            return
        log.info("draining", extra={"in_flight": self.runner.in_flight})
        self.runner.draining = True
        self.stopping.set()
        if self._ws is not None:
            task = asyncio.ensure_future(self.send(Draining()))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def run(self) -> None:
        """Stay connected until stopped; raises :class:`Rejected` when the coordinator refuses us.
        Each reconnection tries the next coordinator URL; one that closes with ``CLOSE_DRAINING``
        (it is shutting down) is left at once, without backoff."""
        attempt, urls = 0, self.config.coordinator_urls
        turn = 0
        while not self.stopping.is_set():
            url = urls[turn % len(urls)]
            self.drained = False
            try:
                welcomed = await self._session(url)
            except Rejected:
                raise
            except OlderCoordinator:
                continue  # at once, with the older hello
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
                if isinstance(exc, ConnectionClosed) and exc.rcvd is not None and exc.rcvd.code == CLOSE_DRAINING:
                    self.drained = True
                else:
                    log.warning("coordinator connection lost", extra={"error": f"{type(exc).__name__}: {exc}"})
                welcomed = False
            if self.stopping.is_set():
                break
            turn += 1
            if self.drained:
                log.info("the coordinator is draining: reconnecting at once", extra={"to": urls[turn % len(urls)]})
                attempt = 0
                continue
            attempt = 0 if welcomed else attempt + 1
            delay = backoff_delay(attempt, self.config.reconnect_min, self.config.reconnect_max)
            log.info("reconnecting", extra={"in_seconds": round(delay, 2)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _session(self, url: str) -> bool:
        """One connection's life; returns whether the coordinator welcomed us."""
        if self._older_welcomed:
            self.protocol, self._older_welcomed = protocol.PROTOCOL_VERSION, False
        headers = {"Authorization": f"Bearer {self.config.token}"}
        try:
            ws = await connect(
                url,
                additional_headers=headers,
                max_size=None,
                compression=None,
                open_timeout=10,
                ping_interval=20,
                ping_timeout=20,
                user_agent_header=f"pool-agent/{__version__}",
            )
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise Rejected("the coordinator refused the agent token (401)") from None
            raise
        try:
            return await self._converse(ws)
        finally:
            if ws.close_code == CLOSE_DRAINING:
                self.drained = True
            self._ws = None
            self.runner.cancel_all()  # results could not be delivered on a new connection
            await ws.close()

    async def _converse(self, ws: ClientConnection) -> bool:
        await ws.send(protocol.encode(self.hello()))
        first = _decoder.decode(await asyncio.wait_for(ws.recv(decode=False), 15))
        if isinstance(first, Reject):
            if self.protocol > 1 and first.reason.startswith("protocol version") and "not supported" in first.reason:
                # An older coordinator (a pool mid-upgrade): speak its version, chat only, and reconnect.
                log.warning(
                    "the coordinator speaks an older protocol: announcing chat only", extra={"reason": first.reason}
                )
                self.protocol = 1
                raise OlderCoordinator(first.reason)
            raise Rejected(first.reason)
        if not isinstance(first, Welcome):
            raise Rejected(f"unexpected first message from the coordinator: {type(first).__name__}")
        self._ws = ws
        self._older_welcomed = self.protocol < protocol.PROTOCOL_VERSION
        self.runner.set_frame_limit(first.limits.max_frame_bytes)
        self.runner.whole_replies = first.whole_replies
        self.runner.progress_interval = first.progress_interval
        log.info("connected", extra={"agent_id": first.agent_id, "models": first.models})
        if self.stopping.is_set():
            await self.send(Draining())
        heartbeat = asyncio.create_task(self._heartbeat(first.heartbeat_interval))
        drain = asyncio.create_task(self._drain_when_stopping(ws))
        try:
            await self._receive(ws)
        finally:
            heartbeat.cancel()
            drain.cancel()
        return True

    async def _receive(self, ws: ClientConnection) -> None:
        async for frame in ws:
            if isinstance(frame, str):
                log.warning("text frame from the coordinator skipped")
                continue
            try:
                message = _decoder.decode(frame)
            except ProtocolError as exc:
                log.warning("invalid frame from the coordinator skipped", extra={"error": str(exc)})
                continue
            match message:
                case JobAssign():
                    await self.runner.start(message, self.send)
                case JobCancel(job_id=job_id):
                    self.runner.cancel(job_id)
                case Reject(reason=reason):
                    raise Rejected(reason)
                case UnknownMessage(tag=tag):
                    log.warning("unknown message skipped", extra={"tag": tag})
                case _:
                    log.warning("unexpected message skipped", extra={"type": type(message).__name__})

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.send(Heartbeat(in_flight=self.runner.in_flight))
            except (ConnectionClosed, ConnectionError):
                return

    async def _drain_when_stopping(self, ws: ClientConnection) -> None:
        await self.stopping.wait()
        finished = await self.runner.wait_idle(self.config.drain_timeout)
        if not finished:
            log.warning("drain timeout: cancelling remaining jobs", extra={"in_flight": self.runner.in_flight})
            self.runner.cancel_all()
        await ws.close(1000, "agent drained")


async def run_agent(config: AgentConfig) -> int:
    """Check the backend, then serve until SIGTERM/SIGINT (exit 0) or refusal (exit 1)."""
    backend = Backend(config)
    try:
        try:
            names = await backend.model_names()
        except Exception as exc:
            print(f"pool-agent: {exc}", flush=True)
            return 2
        missing = [m.backend_model for m in config.models if names and m.backend_model not in names]
        if missing:
            log.info("backend does not list some model names; sending them anyway", extra={"names": missing})
        kinds = {m.backend_model: list(config.kinds) or await backend.kinds(m.backend_model) for m in config.models}
        log.info("job kinds", extra={"kinds": {name: ",".join(served) for name, served in kinds.items()}})
        agent = Agent(config, backend, kinds)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        try:
            await agent.run()
        except Rejected as exc:
            print(f"pool-agent: coordinator rejected this agent: {exc}", flush=True)
            return 1
        log.info("stopped")
        return 0
    finally:
        await backend.aclose()
