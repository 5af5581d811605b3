"""Public views computed at most once per interval, however many clients ask at once.

A view (``/v1/pool/status``, ``/v1/prices?model=…``, a page's figures …) is named by a key. The
first request after the value expires starts one computation; every request that arrives while it
runs awaits that same computation, and the ones after it get the stored value until it expires
again. So a thousand concurrent requests cost one computation, and a flood of distinct keys costs at
most ``max_entries`` stored values (the least recently used are forgotten)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

T = TypeVar("T")


@dataclass
class _Entry:
    expires: float  # monotonic; 0 while computing
    value: Any = None
    computing: asyncio.Future[Any] | None = None  # the computation running for it


class ViewCache:
    def __init__(self, interval: float, max_entries: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_entries = max_entries
        self.clock = clock
        self.computations: Counter[str] = Counter()  # by view name (a key's first part), for /metrics
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    async def get(self, view: str, key: Hashable, compute: Callable[[], Awaitable[T]]) -> T:
        """The value of ``view`` for ``key``: stored if fresh, else computed once for everyone."""
        full = (view, key)
        entry = self._entries.get(full)
        if entry is not None:
            self._entries.move_to_end(full)
            if entry.computing is not None:
                return cast(T, await asyncio.shield(entry.computing))
            if entry.expires > self.clock():
                return cast(T, entry.value)
        entry = self._entries[full] = _Entry(0.0)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        self.computations[view] += 1
        # A task of its own: a client that leaves does not cancel what the others wait for.
        task = entry.computing = asyncio.ensure_future(self._run(full, entry, compute))
        task.add_done_callback(_retrieved)
        return cast(T, await asyncio.shield(task))

    async def _run(self, full: Hashable, entry: _Entry, compute: Callable[[], Awaitable[Any]]) -> Any:
        try:
            value = await compute()
        except BaseException:
            if self._entries.get(full) is entry:
                del self._entries[full]  # the next request tries again
            raise
        entry.value, entry.expires, entry.computing = value, self.clock() + self.interval, None
        return value


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a failed computation's exception seen (its waiters may all have gone)."""
    if not task.cancelled():
        task.exception()
