"""Per-key request and token limits, and limits per client address (failed authentications,
signups).

Token buckets that refill continuously (``limit`` per minute), as OpenAI's limits behave. The token
bucket may go into debt: a request is admitted while the bucket is not empty, charged its estimate,
and corrected to the real usage when it ends, so one large request cannot starve forever.
Alone, a coordinator keeps the buckets in memory (:class:`KeyLimits`); replicas keep them in Redis
(:class:`PoolKeyLimits`: the same buckets, updated by one script call per request, so they hold
pool-wide), and fall back to their own while Redis is away. Failed authentications are counted in
Redis too (:class:`PoolFailureLimits`), off the request's path; signups per address are counted per
process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from redis.exceptions import RedisError

from coordinator.core.cluster import Blocked, Cluster, Push

V = TypeVar("V")


class Bucket:
    """Holds up to ``per_minute`` (per ``period`` seconds), refilled continuously."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: int, now: float, period: float = 60.0) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / period
        self.level = float(per_minute)
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` if the bucket holds it (never into debt)."""
        self.refill(now)
        if self.level < amount:
            return False
        self.level -= amount
        return True

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds ``amount``."""
        return max(0.0, (amount - self.level) / self.rate)

    def until_full(self) -> float:
        return self.wait_for(self.capacity)


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str]
    retry_after: int = 0


class _LRU(Generic[V]):
    """A bounded map: the least recently used entries go first."""

    def __init__(self, max_entries: int) -> None:
        self._data: OrderedDict[object, V] = OrderedDict()
        self._max = max_entries

    def get(self, key: object) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: object, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)


class KeyLimits:
    """Requests-per-minute and tokens-per-minute buckets per consumer key."""

    def __init__(self, default_rpm: int, default_tpm: int, max_keys: int = 100_000) -> None:
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self._buckets: _LRU[tuple[Bucket, Bucket]] = _LRU(max_keys)

    def _pair(self, key_id: int, rpm: int, tpm: int, now: float) -> tuple[Bucket, Bucket]:
        pair = self._buckets.get(key_id)
        if pair is None or pair[0].capacity != rpm or pair[1].capacity != tpm:
            pair = (Bucket(rpm, now), Bucket(tpm, now))
            self._buckets.put(key_id, pair)
        return pair

    def admit(self, key_id: int, estimate: int, rpm: int | None = None, tpm: int | None = None) -> Decision:
        """Take one request and ``estimate`` tokens from the key's buckets, or refuse with headers."""
        now = time.monotonic()
        requests, tokens = self._pair(key_id, rpm or self.default_rpm, tpm or self.default_tpm, now)
        requests.refill(now)
        tokens.refill(now)
        allowed = requests.level >= 1 and tokens.level > 0
        if allowed:
            requests.level -= 1
            tokens.level -= estimate
        return decision(allowed, requests, tokens)

    def correct(self, key_id: int, tokens_delta: int) -> None:
        """Charge (or refund, if negative) the difference between a request's estimate and its usage."""
        pair = self._buckets.get(key_id)
        if pair is not None and tokens_delta:
            bucket = pair[1]
            bucket.refill(time.monotonic())
            bucket.level = min(bucket.capacity, bucket.level - tokens_delta)


def decision(allowed: bool, requests: Bucket, tokens: Bucket) -> Decision:
    """The answer and OpenAI's rate-limit headers, from the key's two buckets after the request."""
    retry = 0 if allowed else max(requests.wait_for(1), tokens.wait_for(1))
    headers = {
        "x-ratelimit-limit-requests": str(int(requests.capacity)),
        "x-ratelimit-remaining-requests": str(max(0, int(requests.level))),
        "x-ratelimit-reset-requests": duration(requests.until_full()),
        "x-ratelimit-limit-tokens": str(int(tokens.capacity)),
        "x-ratelimit-remaining-tokens": str(max(0, int(tokens.level))),
        "x-ratelimit-reset-tokens": duration(tokens.until_full()),
    }
    if not allowed:
        headers["retry-after"] = str(max(1, math.ceil(retry)))
    return Decision(allowed, headers, max(1, math.ceil(retry)) if not allowed else 0)


# KEYS[1]: the key's buckets (a hash). ARGV: requests per minute, tokens per minute, "admit" or
# "correct", and the tokens to take (an estimate to admit; a correction, which may be negative).
# The same arithmetic as Bucket, on Redis's clock, in one atomic step; the hash expires once idle.
_LIMITS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, mode, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local v = redis.call('HMGET', KEYS[1], 'r', 't', 's', 'rc', 'tc')
local r, tk, s = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
if mode == 'correct' then
  if r == nil then return {0, '0', '0'} end
  rpm, tpm = tonumber(v[4]), tonumber(v[5])
elseif r == nil or tonumber(v[4]) ~= rpm or tonumber(v[5]) ~= tpm then
  r, tk, s = rpm, tpm, now
end
local dt = math.max(0, now - s)
r = math.min(rpm, r + dt * rpm / 60)
tk = math.min(tpm, tk + dt * tpm / 60)
local allowed = 0
if mode == 'correct' then
  tk = math.min(tpm, tk - amount)
elseif r >= 1 and tk > 0 then
  r = r - 1
  tk = tk - amount
  allowed = 1
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk), 's', tostring(now), 'rc', rpm, 'tc', tpm)
redis.call('EXPIRE', KEYS[1], 120)
return {allowed, tostring(r), tostring(tk)}
"""


class PoolKeyLimits:
    """:class:`KeyLimits` for the whole pool: in Redis when replicas share one (a script call per
    request), else, and while Redis is away, in this process."""

    def __init__(self, local: KeyLimits, cluster: Cluster) -> None:
        self.local = local
        self.cluster = cluster
        self._script = cluster.client.register_script(_LIMITS) if cluster.client is not None else None
        self._corrections: set[asyncio.Task[None]] = set()

    async def admit(self, key_id: int, estimate: int, rpm: int | None = None, tpm: int | None = None) -> Decision:
        if self._script is None or not self.cluster.healthy:  # while Redis is away, no request waits on it
            return self.local.admit(key_id, estimate, rpm, tpm)
        rpm, tpm = rpm or self.local.default_rpm, tpm or self.local.default_tpm
        try:
            allowed, requests, tokens = await self._script(
                keys=[self.cluster.key("limits", key_id)], args=[rpm, tpm, "admit", estimate]
            )
        except (RedisError, OSError) as exc:
            self.cluster.failed(exc)
            return self.local.admit(key_id, estimate, rpm, tpm)
        now = time.monotonic()
        request_bucket, token_bucket = Bucket(rpm, now), Bucket(tpm, now)
        request_bucket.level, token_bucket.level = float(requests), float(tokens)
        return decision(bool(allowed), request_bucket, token_bucket)

    def correct(self, key_id: int, tokens_delta: int) -> None:
        """As :meth:`KeyLimits.correct`; in Redis, written in the background (off the request's path)."""
        if self._script is None or not self.cluster.healthy:
            self.local.correct(key_id, tokens_delta)
            return
        if tokens_delta:
            task = asyncio.ensure_future(self._correct(key_id, tokens_delta))
            self._corrections.add(task)
            task.add_done_callback(self._corrections.discard)

    async def _correct(self, key_id: int, tokens_delta: int) -> None:
        assert self._script is not None
        try:
            await self._script(keys=[self.cluster.key("limits", key_id)], args=[0, 0, "correct", tokens_delta])
        except (RedisError, OSError) as exc:
            self.cluster.failed(exc)
        self.local.correct(key_id, tokens_delta)


class FailureLimits:
    """Failed authentications per client address: after ``per_minute`` of them, refuse for a while."""

    def __init__(self, per_minute: int, max_clients: int = 100_000) -> None:
        self.per_minute = per_minute
        self._buckets: _LRU[Bucket] = _LRU(max_clients)

    def blocked(self, client: str) -> int:
        """Seconds the client must wait, or 0."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0
        bucket.refill(time.monotonic())
        return 0 if bucket.level >= 1 else max(1, math.ceil(bucket.wait_for(1)))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = Bucket(self.per_minute, now)
            self._buckets.put(client, bucket)
        bucket.refill(now)
        bucket.level = max(0.0, bucket.level - 1)


# KEYS[1]: an address's failed authentications (a hash); ARGV[1]: how many a minute it may have.
# Counts one and returns the seconds until the address may try again ("0": it may now).
_FAILURES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local per = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'l', 's')
local l, s = tonumber(v[1]), tonumber(v[2])
if l == nil then l, s = per, now end
l = math.min(per, l + math.max(0, now - s) * per / 60)
l = math.max(0, l - 1)
redis.call('HSET', KEYS[1], 'l', tostring(l), 's', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
if l >= 1 then return '0' end
return tostring((1 - l) * 60 / per)
"""


class PoolFailureLimits:
    """:class:`FailureLimits` counted over the pool: each failure is also counted in Redis (in the
    background: a failure is not a request to serve), and an address that runs out there is
    blocked on every replica by a push. Whether an address is blocked is always answered from this
    process's memory, so checking costs a request nothing."""

    def __init__(self, local: FailureLimits, cluster: Cluster, max_clients: int = 100_000) -> None:
        self.local = local
        self.cluster = cluster
        self._script = cluster.client.register_script(_FAILURES) if cluster.client is not None else None
        self._blocked: _LRU[float] = _LRU(max_clients)  # address -> monotonic time its block ends
        self._counting: set[asyncio.Task[None]] = set()

    def blocked(self, client: str) -> int:
        """Seconds the client must wait, or 0."""
        until = self._blocked.get(client)
        pushed = max(0, math.ceil(until - time.monotonic())) if until is not None else 0
        return max(self.local.blocked(client), pushed)

    def failed(self, client: str) -> None:
        self.local.failed(client)
        if self._script is not None and self.cluster.healthy:
            task = asyncio.ensure_future(self._count(client))
            self._counting.add(task)
            task.add_done_callback(self._counting.discard)

    async def _count(self, client: str) -> None:
        assert self._script is not None
        try:
            # by address_key: one IPv6 client rotating through its /64 counts, and costs Redis, as one
            key = self.cluster.key("authfail", address_key(client))
            wait = float(await self._script(keys=[key], args=[self.local.per_minute]))
        except (RedisError, OSError) as exc:
            self.cluster.failed(exc)
            return
        if wait > 0:
            await self.cluster.push(Blocked(client, wait))

    def on_push(self, push: Push) -> None:
        if isinstance(push, Blocked):
            self._blocked.put(push.client, time.monotonic() + push.seconds)


def address_key(client: str) -> str:
    """What a limit per address counts by: the address, or for IPv6 its /64 (one subscriber's
    network, where a client can pick any of 2**64 addresses)."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return client


class AddressLimits:
    """At most ``limit`` actions (signups) per ``period`` seconds per client address, refilled
    continuously; a refused action is not counted."""

    def __init__(self, limit: int, period: float, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.period = period
        self._buckets: _LRU[Bucket] = _LRU(max_clients)

    def take(self, client: str) -> int:
        """Count one action and return 0, or return the seconds until the client may act again."""
        now = time.monotonic()
        key = address_key(client)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = Bucket(self.limit, now, self.period)
            self._buckets.put(key, bucket)
        bucket.refill(now)
        if bucket.level < 1:
            return max(1, math.ceil(bucket.wait_for(1)))
        bucket.level -= 1
        return 0
