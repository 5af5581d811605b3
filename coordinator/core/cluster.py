"""What coordinator replicas share through Redis (``POOL_REDIS_URL``): one client, whether Redis is
answering, and a pub/sub channel for pushes (a revoked key or agent token, an address blocked for
failed authentications) that every replica acts on at once.

Without ``POOL_REDIS_URL`` a coordinator is alone: :attr:`Cluster.client` is ``None`` and nothing
here touches the network. With it, Redis trouble never stops a replica: callers fall back to what the
process knows by itself, :attr:`Cluster.healthy` turns false (``/readyz`` says ``degraded``, and
callers stop asking Redis, so no request waits on a connection timeout), and the listener
reconnects until Redis answers again, which makes it healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

TIMEOUT = 0.5  # seconds a Redis call may take before the replica goes on without it
RETRY = 0.5  # seconds between attempts to listen again after Redis went away


class Push(msgspec.Struct, tag_field="kind"):
    """A message every replica acts on."""


KEY = "key"
AGENT_TOKEN = "agent_token"


class Revoked(Push, tag="revoked"):
    """A consumer key or agent token was revoked: forget it now, not when a cache entry expires."""

    credential: str  # KEY or AGENT_TOKEN
    credential_id: int


class Blocked(Push, tag="blocked"):
    """An address failed authentication too often, counted over the pool: refuse it for ``seconds``."""

    client: str
    seconds: float


_decoder = msgspec.json.Decoder(Revoked | Blocked)
Handler = Callable[[Push], None]


class Cluster:
    def __init__(self, url: str | None, prefix: str = "pool:") -> None:
        self.client: redis.Redis | None = (
            redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT) if url else None
        )
        # pushes arrive on a connection of their own, which waits without a timeout
        self._subscriber = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT) if url else None
        self.prefix = prefix
        self.healthy = True
        self.errors = 0  # Redis calls that failed (``/metrics``)
        self._handlers: list[Handler] = []
        self._listener: asyncio.Task[None] | None = None
        self._last_warning = 0.0

    @property
    def channel(self) -> str:
        return f"{self.prefix}push"

    def key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(part) for part in parts)

    def failed(self, exc: Exception) -> None:
        """A Redis call failed: count it, and say so in the log at most once every 10 s."""
        self.errors += 1
        self.healthy = False
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("redis unavailable: going on without it", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def ping(self) -> str:
        """``ok``, ``off`` (no Redis configured) or what is wrong."""
        if self.client is None:
            return "off"
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self.failed(exc)
            return f"degraded: {type(exc).__name__}"
        return "ok" if self.healthy else "degraded: reconnecting"  # answers again: the listener's probe decides

    async def _probe(self) -> None:
        """Healthy again once Redis answers the client the callers use."""
        assert self.client is not None
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self.failed(exc)
            return
        self.healthy = True

    def on_push(self, handler: Handler) -> None:
        self._handlers.append(handler)

    async def push(self, message: Push) -> None:
        """Tell every replica (this one too, through the channel); without Redis, just this one."""
        if self.client is not None:
            try:
                await self.client.publish(self.channel, msgspec.json.encode(message))
                return
            except (RedisError, OSError) as exc:
                self.failed(exc)
        self._deliver(message)

    def _deliver(self, message: Push) -> None:
        for handler in self._handlers:
            try:
                handler(message)
            except Exception:
                log.exception("push handler failed", extra={"push": type(message).__name__})

    def start(self) -> None:
        if self.client is not None and self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        assert self._subscriber is not None
        while True:
            pubsub = self._subscriber.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._probe()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if not self.healthy:  # a call failed meanwhile: ask again, once a second at most
                        await self._probe()
                    if message is not None and message["type"] == "message":
                        try:
                            self._deliver(_decoder.decode(message["data"]))
                        except msgspec.ValidationError as exc:
                            log.warning("unreadable push skipped", extra={"error": str(exc)})
            except (RedisError, OSError) as exc:
                self.failed(exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RETRY)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for client in (self.client, self._subscriber):
            if client is not None:
                await client.aclose()
