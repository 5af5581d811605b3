"""A scriptable hostile agent: a real websocket client that speaks the agent protocol (msgpack
frames, hello, heartbeats) and answers jobs however a test tells it to. What a real pool-agent
never does, an attacker's own client can: this is that client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from shared import protocol
from shared.protocol import (
    Heartbeat,
    Hello,
    JobAssign,
    JobCancel,
    JobChunk,
    JobDone,
    Message,
    ModelOffer,
    Reject,
    Usage,
    Welcome,
)

Serve = Callable[["HostileAgent", JobAssign], Awaitable[None]]
_json = msgspec.json.Encoder()


def offer(slug: str = "smollm2-135m", price_in: int = 1, price_out: int = 1, **kw: Any) -> ModelOffer:
    """An offer cheaper than any honest one, so placement prefers the hostile agent while it is trusted."""
    return ModelOffer(slug, "hostile-model", price_in, price_out, **kw)


def chunk(content: str | None = None, *, finish: str | None = None, **delta: Any) -> bytes:
    """A streamed chat.completion.chunk payload."""
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _json.encode({"id": "chatcmpl-h", "object": "chat.completion.chunk", "choices": [choice]})


def reply(content: str) -> bytes:
    """A whole (non-stream) chat.completion payload."""
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return _json.encode({"id": "chatcmpl-h", "object": "chat.completion", "choices": [choice]})


class HostileAgent:
    """``async with HostileAgent(url, token, serve=…)``: connected, welcomed (or ``rejected``), and
    answering each job with ``serve`` in a task of its own."""

    def __init__(
        self,
        pool_url: str,
        token: str,
        *,
        models: list[ModelOffer] | None = None,
        max_concurrency: int = 4,
        serve: Serve | None = None,
    ) -> None:
        self.url = pool_url.replace("http://", "ws://") + "/v1/agent/connect"
        self.token = token
        self.hello = Hello(
            protocol=protocol.PROTOCOL_VERSION,
            agent_version="hostile",
            models=models or [offer()],
            max_concurrency=max_concurrency,
        )
        self.serve = serve
        self.assigned: list[JobAssign] = []
        self.cancelled: list[str] = []
        self.welcome: Welcome | None = None
        self.rejected: str | None = None
        self.closed: asyncio.Event = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._decoder = protocol.coordinator_decoder()

    async def __aenter__(self) -> HostileAgent:
        self._ws = await connect(
            self.url, additional_headers={"Authorization": f"Bearer {self.token}"}, max_size=None, ping_interval=None
        )
        await self._ws.send(protocol.encode(self.hello))
        first = self._decoder.decode(await self._ws.recv(decode=False))  # type: ignore[arg-type]
        if isinstance(first, Reject):
            self.rejected = first.reason
            return self
        assert isinstance(first, Welcome), first
        self.welcome = first
        self._spawn(self._beat())
        self._spawn(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _beat(self) -> None:
        assert self.welcome is not None
        while True:
            await asyncio.sleep(self.welcome.heartbeat_interval / 2)
            await self.send(Heartbeat())

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                message = self._decoder.decode(frame)  # type: ignore[arg-type]
                if isinstance(message, JobAssign):
                    self.assigned.append(message)
                    if self.serve is not None:
                        self._spawn(self.serve(self, message))
                elif isinstance(message, JobCancel):
                    self.cancelled.append(message.job_id)
        except Exception:  # closed by the coordinator
            pass
        finally:
            self.closed.set()

    async def send(self, message: Message) -> None:
        assert self._ws is not None
        await self._ws.send(protocol.encode(message))

    async def send_raw(self, frame: bytes) -> None:
        assert self._ws is not None
        await self._ws.send(frame)

    async def stream(
        self,
        job_id: str,
        payloads: list[bytes],
        *,
        usage: Usage | None = None,
        finish: str | None = "stop",
        pause: float = 0.0,
    ) -> None:
        """Send ``payloads`` as the job's chunks, then its end with ``usage``."""
        for seq, payload in enumerate(payloads):
            await self.send(JobChunk(job_id=job_id, seq=seq, data=payload))
            if pause:
                await asyncio.sleep(pause)
        await self.send(JobDone(job_id=job_id, usage=usage, finish_reason=finish, tail=[chunk(finish=finish)]))

    @property
    def agent_id(self) -> str:
        assert self.welcome is not None
        return self.welcome.agent_id
