"""Run jobs concurrently up to capacity; cancel on request; drain on shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from provider_agent.backends import Backend
from shared import errors, logs
from shared.backend import ENDPOINTS, Chunk, Done
from shared.protocol import JobAssign, JobChunk, JobDone, JobFailed, JobProgress, Message

log = logging.getLogger(__name__)

Send = Callable[[Message], Awaitable[None]]

_FRAME_HEADROOM = 4096


class Runner:
    def __init__(self, backend: Backend, max_concurrency: int) -> None:
        self.backend = backend
        self.max_concurrency = max_concurrency
        self.max_chunk_bytes = 1024 * 1024
        self.whole_replies = False  # the coordinator takes a non-streamed reply in its JobDone
        self.progress_interval = 0.0  # seconds between JobProgress on non-stream jobs (0: none)
        self.draining = False
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def set_frame_limit(self, max_frame_bytes: int) -> None:
        self.max_chunk_bytes = max(1024, max_frame_bytes - _FRAME_HEADROOM)

    async def start(self, assign: JobAssign, send: Send) -> None:
        """Accept a job, or refuse it (retryably) when draining or full."""
        if self.draining or len(self._tasks) >= self.max_concurrency:
            code = errors.AGENT_DRAINING if self.draining else errors.AGENT_BUSY
            await send(JobFailed(job_id=assign.job_id, code=code, message=code.replace("_", " "), retryable=True))
            return
        task = asyncio.create_task(self._run(assign, send), name=assign.job_id)
        self._tasks[assign.job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(assign.job_id, None))

    def cancel(self, job_id: str) -> bool:
        task = self._tasks.get(job_id)
        if task is None:
            return False
        task.cancel()
        return True

    def cancel_all(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for in-flight jobs to finish; ``False`` if some were still running at the timeout."""
        tasks = list(self._tasks.values())
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def _progress(self, job_id: str, send: Send) -> None:
        """Tell the coordinator, while a non-stream job's backend works, that the job is alive."""
        try:
            while True:
                await asyncio.sleep(self.progress_interval)
                await send(JobProgress(job_id=job_id))
        except Exception as exc:  # the socket went away: the job's own send reports it
            log.debug("progress not sent", extra={"job_id": job_id, "error": type(exc).__name__})

    async def _run(self, assign: JobAssign, send: Send) -> None:
        logs.request_id.set(assign.request_id or None)  # this job's task: its logs name the request
        ticker = None
        if not assign.stream and self.progress_interval > 0:
            ticker = asyncio.create_task(self._progress(assign.job_id, send))
        try:
            await self._serve(assign, send)
        finally:
            if ticker is not None:
                ticker.cancel()

    async def _serve(self, assign: JobAssign, send: Send) -> None:
        job_id = assign.job_id
        started = time.perf_counter()
        seq = 0
        whole: list[bytes] = []  # a non-streamed reply that goes out with its JobDone
        try:
            async with asyncio.timeout(max(0.1, assign.deadline - time.time())):
                if assign.kind not in ENDPOINTS:  # a newer coordinator's kind: not this agent's to guess
                    raise ValueError(f"job kind {assign.kind!r} is not one this agent serves")
                events = self.backend.run(
                    assign.kind,
                    assign.request,
                    assign.backend_model,
                    stream=assign.stream,
                    want_usage=assign.want_usage,
                )
                async for event in events:
                    if isinstance(event, Chunk):
                        if not assign.stream and self.whole_replies and len(event.data) <= self.max_chunk_bytes:
                            whole.append(event.data)
                            continue
                        for piece in self._pieces(event.data) if not assign.stream else (event.data,):
                            await send(JobChunk(job_id=job_id, seq=seq, data=piece))
                            seq += 1
                    elif isinstance(event, Done):
                        await send(
                            JobDone(
                                job_id=job_id,
                                usage=event.usage,
                                finish_reason=event.finish_reason,
                                tail=[*whole, *event.tail],
                            )
                        )
                    else:
                        log.warning("job failed", extra={"job_id": job_id, "code": event.code, "status": event.status})
                        await send(
                            JobFailed(
                                job_id=job_id,
                                code=event.code,
                                message=event.message,
                                retryable=event.retryable,
                                status=event.status,
                            )
                        )
        except TimeoutError:
            await send(JobFailed(job_id=job_id, code=errors.DEADLINE_EXCEEDED, message="job deadline exceeded"))
        except asyncio.CancelledError:
            log.info("job cancelled", extra={"job_id": job_id})
            raise
        except (msgspec.DecodeError, ValueError) as exc:
            await send(JobFailed(job_id=job_id, code=errors.BACKEND_REJECTED, message=f"unusable request: {exc}"))
        except Exception as exc:  # the socket went away mid-job: nothing left to report to
            log.warning("job aborted", extra={"job_id": job_id, "error": type(exc).__name__})
        else:
            log.debug("job done", extra={"job_id": job_id, "ms": round((time.perf_counter() - started) * 1000)})

    def _pieces(self, data: bytes) -> list[bytes]:
        size = self.max_chunk_bytes
        if len(data) <= size:
            return [data]
        return [data[i : i + size] for i in range(0, len(data), size)]
