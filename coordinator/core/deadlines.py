"""Deadlines for slow clients: a request's headers within ``header_timeout`` and its body within
``body_timeout`` of its start, or the connection is closed.

uvicorn has no header timeout of its own, so a client that connects and then sends a header byte
every few seconds (slowloris), or a body the same way, holds a connection and its memory for ever;
enough of them exhaust the process. :func:`protocol` makes uvicorn's httptools protocol arm one timer
per connection and per request that does not arrive in one read (on connecting, or when a read leaves
a request incomplete) and cancel it when the request has fully arrived: a request that comes whole,
the usual case, costs no timer at all. Nothing changes for a request once it has arrived (a long
stream runs as long as it needs), nor for a websocket once upgraded (agents); while uvicorn itself
has stopped reading (the application has not read the body yet, or a pipelined request waits its
turn) the clock is not the client's fault and the deadline waits.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

PAUSED_RECHECK = 1.0  # seconds between looks at a deadline that passed while reading was paused


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines (set by :func:`protocol`)."""

    header_timeout = 10.0
    body_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._pending = False  # a request has begun and not fully arrived
        self._headers_done = False
        self._completed = 0  # requests that fully arrived on this connection
        self._upgraded = False  # a websocket protocol has the connection now

    def _arm(self) -> None:
        """The deadlines run from now."""
        self._started = self.loop.time()
        self._timer = self.loop.call_at(self._started + self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:  # we are not reading: not the client's delay
            self._timer = self.loop.call_later(PAUSED_RECHECK, self._expired)
            return
        if not self._pending and self.cycle is not None and not self.cycle.response_complete:
            return  # stray bytes after a request still being answered; uvicorn's keep-alive follows it
        body_due = self._started + self.body_timeout
        if self._pending and self._headers_done and body_due > self.loop.time():
            self._timer = self.loop.call_at(body_due, self._expired)
            return
        self.transport.close()

    # --- uvicorn's protocol and parser callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a client that connects and sends nothing

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        completed = self._completed
        super().data_received(data)
        # A request that arrives whole in one read (the usual case) needs no timer at all.
        if self._timer is None and not self._upgraded and (self._pending or self._completed == completed):
            self._arm()  # part of a request, or bytes that began none (a kept-alive connection's)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._pending, self._headers_done = True, False

    def on_headers_complete(self) -> None:
        self._headers_done = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._pending = False
        self._completed += 1
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._pending, self._upgraded = False, True
        self._disarm()
        super().handle_websocket_upgrade()


def protocol(header_timeout: float, body_timeout: float) -> type[DeadlineProtocol]:
    """The protocol class to give ``uvicorn.run(http=…)``, with these deadlines in seconds."""
    return type(
        "PoolHttpProtocol", (DeadlineProtocol,), {"header_timeout": header_timeout, "body_timeout": body_timeout}
    )
