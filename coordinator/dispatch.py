"""Job lifecycle: assign to an agent, relay its events, cancel, fail over, fall back.

A job — on an agent or on the upstream — is a queue of :mod:`shared.backend` events that ends with
one ``Done`` or ``Failure``; the chat route reads it the same way whichever side serves it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from coordinator import placement
from coordinator.metering import Price
from coordinator.registry import ConnectedAgent, Registry
from coordinator.upstream import Upstream
from shared import errors
from shared.backend import Chunk, Done, Event, Failure
from shared.protocol import JobAssign, JobCancel, JobChunk, JobDone, JobFailed

log = logging.getLogger(__name__)

AGENT_LOST = "agent_lost"
TIMED_OUT = "timed_out"


class Job:
    """One attempt at a request, on an agent (``agent`` set) or on the upstream."""

    def __init__(self, job_id: str, agent: ConnectedAgent | None) -> None:
        self.job_id = job_id
        self.agent = agent
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False
        self._task: asyncio.Task[None] | None = None
        self._dispatcher: Dispatcher | None = None

    @property
    def fallback(self) -> bool:
        return self.agent is None

    async def next(self, timeout: float) -> Event:
        """The next event; a ``Failure`` if none comes within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return Failure(TIMED_OUT, f"no output for {timeout:g} s", True)

    def ready(self) -> list[Event]:
        """Events already queued, without waiting."""
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events

    def cancel(self) -> None:
        """Stop the job if it is still running; safe to call at any time, never blocks."""
        if self.finished:
            return
        if self._task is not None:
            self.finished = True
            self._task.cancel()
        elif self._dispatcher is not None:
            self._dispatcher.cancel(self)


@dataclass(frozen=True)
class Attempt:
    """The job that produced a request's first event, and that event."""

    job: Job
    first: Event


class Dispatcher:
    def __init__(self, registry: Registry, upstream: Upstream, first_chunk_timeout: float, job_deadline: float) -> None:
        self.registry = registry
        self.upstream = upstream
        self.first_chunk_timeout = first_chunk_timeout
        self.job_deadline = job_deadline
        self._jobs: dict[str, Job] = {}
        self._background: set[asyncio.Task[None]] = set()

    # --- starting --------------------------------------------------------------------------

    async def assign(self, agent: ConnectedAgent, slug: str, raw: bytes, *, stream: bool, want_usage: bool) -> Job:
        job = Job("job_" + secrets.token_hex(8), agent)
        job._dispatcher = self
        self._jobs[job.job_id] = job
        agent.jobs.add(job.job_id)
        agent.in_flight += 1
        message = JobAssign(
            job_id=job.job_id,
            model=slug,
            backend_model=agent.models[slug].backend_model,
            request=raw,
            stream=stream,
            want_usage=want_usage,
            deadline=time.time() + self.job_deadline,
        )
        try:
            await agent.link.send(message)
        except Exception as exc:  # the socket died under us: same as losing the agent
            self._finish(job, Failure(AGENT_LOST, f"agent unreachable: {exc}", True))
        return job

    def run_upstream(self, slug: str, raw: bytes, *, stream: bool, want_usage: bool) -> Job:
        job = Job("job_" + secrets.token_hex(8), None)
        events = self.upstream.run(slug, raw, stream=stream, want_usage=want_usage)
        job._task = asyncio.create_task(self._pump(job, events))
        return job

    async def _pump(self, job: Job, events: AsyncIterator[Event]) -> None:
        async for event in events:
            job.queue.put_nowait(event)
        job.finished = True

    def ceiling(self, slug: str) -> Price | None:
        """The highest input and output prices anyone able to serve ``slug`` now asks (what a hold
        must cover), or ``None`` when nobody can serve it."""
        prices = [placement.offer_price(agent, slug) for agent in self.registry.serving(slug) if agent.free_slots > 0]
        if self.upstream.serves(slug):
            prices.append(self.upstream.price)
        if not prices:
            return None
        return Price(max(p.input for p in prices), max(p.output for p in prices))

    async def start(
        self, slug: str, raw: bytes, *, stream: bool, want_usage: bool, max_price: Price | None = None
    ) -> Attempt | None:
        """Run the request on the best agent no dearer than ``max_price``, failing over before the
        first event, then on the upstream; ``None`` when nobody can take it. A non-retryable
        failure is returned as is."""
        tried: set[str] = set()
        last_failure: Failure | None = None
        while (agent := placement.choose(self.registry, slug, exclude=tried, max_price=max_price)) is not None:
            tried.add(agent.agent_id)
            job = await self.assign(agent, slug, raw, stream=stream, want_usage=want_usage)
            first = await job.next(self.first_chunk_timeout)
            if isinstance(first, Failure):
                job.cancel()
                if first.retryable:
                    log.warning(
                        "job failed before output, failing over",
                        extra={"job_id": job.job_id, "agent_id": agent.agent_id, "code": first.code},
                    )
                    last_failure = first
                    continue
            return Attempt(job, first)
        if self.upstream.serves(slug) and (max_price is None or max_price.covers(self.upstream.price)):
            job = self.run_upstream(slug, raw, stream=stream, want_usage=want_usage)
            return Attempt(job, await job.next(self.first_chunk_timeout))
        if last_failure is not None:
            return Attempt(Job("job_none", None), last_failure)
        return None

    # --- events from agents ----------------------------------------------------------------

    def on_chunk(self, message: JobChunk) -> None:
        job = self._jobs.get(message.job_id)
        if job is not None:
            job.queue.put_nowait(Chunk(message.data))

    def on_done(self, message: JobDone) -> None:
        job = self._jobs.get(message.job_id)
        if job is not None:
            self._finish(job, Done(message.usage, message.finish_reason, message.tail))

    def on_failed(self, message: JobFailed) -> None:
        job = self._jobs.get(message.job_id)
        if job is not None:
            self._finish(job, Failure(message.code, message.message, message.retryable, message.status))

    def agent_lost(self, agent: ConnectedAgent, reason: str) -> None:
        """Fail every job of a lost agent; callers waiting for a first event fail over."""
        for job_id in list(agent.jobs):
            job = self._jobs.get(job_id)
            if job is not None:
                self._finish(job, Failure(AGENT_LOST, f"provider agent lost: {reason}", True))

    def cancel(self, job: Job) -> None:
        """Tell the agent to stop ``job`` and free its slot (fire and forget)."""
        agent = job.agent
        self._finish(job, None)
        if agent is not None and self.registry.get(agent.agent_id) is agent:
            task = asyncio.create_task(self._send_cancel(agent, job.job_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_cancel(self, agent: ConnectedAgent, job_id: str) -> None:
        try:
            await agent.link.send(JobCancel(job_id=job_id))
        except Exception as exc:
            log.info("could not send job.cancel", extra={"job_id": job_id, "error": str(exc)})

    def _finish(self, job: Job, last: Event | None) -> None:
        if job.finished:
            return
        job.finished = True
        self._jobs.pop(job.job_id, None)
        if job.agent is not None:
            job.agent.jobs.discard(job.job_id)
            job.agent.in_flight = max(0, job.agent.in_flight - 1)
        if last is not None:
            job.queue.put_nowait(last)

    def in_flight(self) -> int:
        return len(self._jobs)


def provider_error(failure: Failure) -> tuple[int, str, str]:
    """HTTP status, code and message for a failure that reaches the consumer: a backend refusing
    the request itself (400/413/422) is the consumer's error, anything else the provider's."""
    if failure.code == errors.BACKEND_REJECTED and failure.status in (400, 413, 422):
        return (413 if failure.status == 413 else 400), errors.INVALID_REQUEST, failure.message
    return 502, errors.PROVIDER_ERROR, f"The provider failed: {failure.message}"
