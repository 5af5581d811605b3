"""The HTTP server: uvicorn, with SIGTERM draining the pool (:mod:`coordinator.services.drain`)
before the usual shutdown, and SIGINT (or a second SIGTERM) shutting down at once."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

import uvicorn

from coordinator.services import drain
from coordinator.services.state import PoolState


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, pool: PoolState) -> None:
        super().__init__(config)
        self.pool = pool
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future[None] | None = None
        self._drain_asked = False  # set in the signal handler itself: a second SIGTERM stops at once

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._drain_asked and not self.should_exit and self._loop is not None:
            self._drain_asked = True
            self._captured_signals.append(sig)  # uvicorn raises it again once shut down, as it would have
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain.drain(self.pool)
        finally:
            self.should_exit = True
