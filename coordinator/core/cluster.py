"""What coordinator replicas share through Redis (``POOL_REDIS_URL``): one client, whether Redis is
answering, a pub/sub channel for pushes (a revoked key or agent token, an address blocked for
failed authentications) that every replica acts on at once, and the channels other parts listen on
(the agent mirror's, a replica's own for the job relay) with one ordered sender for them.

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
from collections.abc import Awaitable, Callable

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

TIMEOUT = 0.5  # seconds a Redis call may take before the replica goes on without it
RETRY = 0.5  # seconds between attempts to listen again after Redis went away
HEALTH_CHECK = 2.0  # seconds of silence after which the listening connection is pinged


class Push(msgspec.Struct, tag_field="kind"):
    """A message every replica acts on."""


KEY = "key"
AGENT_TOKEN = "agent_token"


class Revoked(Push, tag="revoked"):
    """A consumer key or agent token was revoked: forget it now, not when a cache entry expires."""

    credential: str  # KEY or AGENT_TOKEN
    credential_id: int


class KeyChanged(Push, tag="key_changed"):
    """A consumer key's policy changed: read it again on its next request, not when the cache expires."""

    key_id: int


class Blocked(Push, tag="blocked"):
    """An address failed authentication too often, counted over the pool: refuse it for ``seconds``."""

    client: str
    seconds: float


class Vouched(Push, tag="vouched"):
    """A canary for ``slug`` passed, answered by ``agent_id`` ``ago`` seconds before it was sent:
    that agent's jobs which ended before then stand, on every replica that served them."""

    token_id: int
    agent_id: str
    slug: str
    ago: float


class Disagreed(Push, tag="disagreed"):
    """A canary for ``slug`` failed on a prompt (its digest): a strike on every replica."""

    token_id: int
    slug: str
    prompt: str


_decoder = msgspec.json.Decoder(Revoked | KeyChanged | Blocked | Vouched | Disagreed)
Handler = Callable[[Push], None]
Listener = Callable[[bytes], None]  # what arrived on a channel, raw
Dropped = Callable[[], None]  # a message that will never be published (Redis away, or too slow)
Connected = Callable[[], Awaitable[None]]

# Messages, and bytes (a relayed job carries its request), waiting for the sender at most: past
# either, Redis is too slow and what more comes is dropped (its senders are told).
OUTBOX = 100_000
OUTBOX_BYTES = 64 * 1024 * 1024


class Cluster:
    def __init__(self, url: str | None, prefix: str = "pool:") -> None:
        self.client: redis.Redis | None = (
            redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT) if url else None
        )
        # pushes arrive on a connection of their own, which waits without a timeout (and pings now
        # and then, so a connection that died without a word is noticed)
        self._subscriber = (
            redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT, health_check_interval=HEALTH_CHECK)
            if url
            else None
        )
        self.prefix = prefix
        self.healthy = True
        self.errors = 0  # Redis calls that failed (``/metrics``)
        self._handlers: list[Handler] = []
        self._channels: dict[str, Listener] = {}
        self._connected: list[Connected] = []
        self._listener: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, Dropped | None]] = asyncio.Queue(OUTBOX)
        self._last_warning = 0.0
        self.subscribed = asyncio.Event()  # set while the listener is subscribed to every channel
        self.dropped = 0  # messages the sender dropped (Redis away or too slow)
        self.subscriptions = 0  # times the listener subscribed: what was published between two was lost
        self._outbox_bytes = 0

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

    def listen(self, channel: str, listener: Listener) -> None:
        """Call ``listener`` with each message on ``channel`` (a full name: :meth:`key` makes one)."""
        self._channels[channel] = listener

    def on_connected(self, callback: Connected) -> None:
        """Call ``callback`` each time the listener has (re)subscribed: what was published while it
        was away is lost, so whoever keeps a copy of shared state reads it again then."""
        self._connected.append(callback)

    def send(self, channel: str, payload: bytes, dropped: Dropped | None = None) -> bool:
        """Publish ``payload`` on ``channel`` in the background, in the order of the calls (one
        sender, one connection); ``False`` when it is dropped at once (no Redis, or Redis away).
        ``dropped`` is called if it is dropped later (the publication failed)."""
        if self.client is None or not self.healthy or self._outbox_bytes + len(payload) > OUTBOX_BYTES:
            self.dropped += 1
            return False
        try:
            self._outbox.put_nowait((channel, payload, dropped))
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        self._outbox_bytes += len(payload)
        return True

    async def _send_all(self) -> None:
        """Publish the outbox in order; what waits together goes in one pipeline (one round trip)."""
        assert self.client is not None
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty() and len(batch) < 512:
                batch.append(self._outbox.get_nowait())
            self._outbox_bytes -= sum(len(payload) for _, payload, _ in batch)
            try:
                if len(batch) == 1:
                    await self.client.publish(batch[0][0], batch[0][1])
                else:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for channel, payload, _ in batch:
                            pipe.publish(channel, payload)
                        await pipe.execute()
            except (RedisError, OSError) as exc:
                self.dropped += len(batch)
                self.failed(exc)
                for _, _, dropped in batch:
                    if dropped is not None:
                        try:
                            dropped()
                        except Exception:
                            log.exception("dropped-message handler failed")

    async def push(self, message: Push) -> None:
        """Tell every replica (this one too, through the channel); without Redis, just this one."""
        if self.client is not None:
            try:
                await self.client.publish(self.channel, msgspec.json.encode(message))
                return
            except (RedisError, OSError) as exc:
                self.failed(exc)
        self._deliver(message)

    def tell(self, message: Push) -> None:
        """:meth:`push` without waiting: in order, in the background (this replica hears it through
        the channel too); without Redis, or while it is away, this replica acts on it at once."""
        if not self.send(self.channel, msgspec.json.encode(message), lambda: self._deliver(message)):
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
            self._sender = asyncio.create_task(self._send_all())

    async def _listen(self) -> None:
        assert self._subscriber is not None
        while True:
            pubsub = self._subscriber.pubsub()
            try:
                await pubsub.subscribe(self.channel, *self._channels)
                self.subscriptions += 1
                await self._probe()
                await self._resync()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if not self.healthy:  # a call failed meanwhile: ask again, once a second at most
                        await self._probe()
                        await self._resync()
                    if message is not None and message["type"] == "message":
                        self._received(message["channel"].decode(), message["data"])
            except (RedisError, OSError) as exc:
                self.failed(exc)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RETRY)

    async def _resync(self) -> None:
        """Healthy and subscribed: those who keep shared state read it again (messages were lost)."""
        if self.healthy:
            for callback in self._connected:
                try:
                    await callback()
                except (RedisError, OSError):
                    raise
                except Exception:  # a bug in one must not stop the listener (revocations, the relay)
                    log.exception("resync failed")
            self.subscribed.set()

    def _received(self, channel: str, data: bytes) -> None:
        listener = self._channels.get(channel)
        try:
            if listener is not None:
                listener(data)
            else:
                self._deliver(_decoder.decode(data))
        except msgspec.ValidationError as exc:
            log.warning("unreadable message skipped", extra={"channel": channel, "error": str(exc)})
        except Exception:
            log.exception("message handler failed", extra={"channel": channel})

    async def close(self) -> None:
        for task in (self._listener, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for client in (self.client, self._subscriber):
            if client is not None:
                await client.aclose()
