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

from coordinator import placement, trust
from coordinator.metering import Price
from coordinator.placement import Routing
from coordinator.registry import ConnectedAgent, Performance, Registry
from coordinator.trust import TrustBook
from coordinator.upstream import Upstream
from shared import errors
from shared.backend import Chunk, Done, Event, Failure
from shared.protocol import JobAssign, JobCancel, JobChunk, JobDone, JobFailed

log = logging.getLogger(__name__)

AGENT_LOST = "agent_lost"
TIMED_OUT = "timed_out"


class Job:
    """One attempt at a request, on an agent (``agent`` set) or on the upstream."""

    def __init__(self, job_id: str, agent: ConnectedAgent | None, slug: str) -> None:
        self.job_id = job_id
        self.agent = agent
        self.slug = slug
        self.assigned_at = time.perf_counter()
        self.first_at: float | None = None  # when its first output arrived
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False
        self._task: asyncio.Task[None] | None = None
        self._dispatcher: Dispatcher | None = None

    @property
    def fallback(self) -> bool:
        return self.agent is None

    async def next(self, timeout: float) -> Event:
        """The next event; a ``Failure`` if none comes within ``timeout`` seconds."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        try:
            async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
                return await self.queue.get()
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
class Route:
    """Why a request went where it went (``x_pool``): the model served, the placement's reason,
    how many agents could have taken it, and how many were tried."""

    model: str
    reason: str
    candidates: int
    attempts: int


@dataclass(frozen=True)
class Attempt:
    """The job that produced a request's first event, that event, and how it was chosen."""

    job: Job
    first: Event
    route: Route


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        upstream: Upstream,
        first_chunk_timeout: float,
        job_deadline: float,
        trust_floor: float = 0.0,
        trust: TrustBook | None = None,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.trust_floor = trust_floor
        self.trust = trust
        self.first_chunk_timeout = first_chunk_timeout
        self.job_deadline = job_deadline
        self._jobs: dict[str, Job] = {}
        self._background: set[asyncio.Task[None]] = set()

    # --- starting --------------------------------------------------------------------------

    async def assign(self, agent: ConnectedAgent, slug: str, raw: bytes, *, stream: bool, want_usage: bool) -> Job:
        job = Job("job_" + secrets.token_hex(8), agent, slug)
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
        job = Job("job_" + secrets.token_hex(8), None, slug)
        events = self.upstream.run(slug, raw, stream=stream, want_usage=want_usage)
        job._task = asyncio.create_task(self._pump(job, events))
        return job

    async def _pump(self, job: Job, events: AsyncIterator[Event]) -> None:
        async for event in events:
            job.queue.put_nowait(event)
        job.finished = True

    def ceiling(self, slugs: list[str], routing: Routing) -> Price | None:
        """The highest input and output prices of anyone who may serve the request now (what a hold
        must cover), or ``None`` when nobody can serve it."""
        prices = []
        for slug in slugs:
            agents = placement.ceiling(self.registry, slug, routing, trust_floor=self.trust_floor)
            if agents is not None:
                prices.append(agents)
            if self.upstream.serves(slug) and routing.admits_upstream(self.upstream.price):
                prices.append(self.upstream.price)
        if not prices:
            return None
        return Price(max(p.input for p in prices), max(p.output for p in prices))

    async def start(
        self,
        slugs: list[str],
        raw: bytes,
        *,
        stream: bool,
        want_usage: bool,
        routing: Routing = placement.DEFAULT_ROUTING,
        max_price: Price | None = None,
    ) -> Attempt | None:
        """Run the request on the best agent no dearer than ``max_price`` for each model in turn,
        failing over before the first event, then on the upstream for that model; ``None`` when
        nobody can take it. A non-retryable failure is returned as is."""
        tried: set[str] = set()
        last_failure: Failure | None = None
        attempts = 0
        for slug in slugs:
            while (
                choice := placement.choose(
                    self.registry, slug, routing, trust_floor=self.trust_floor, exclude=tried, max_price=max_price
                )
            ) is not None:
                attempts += 1
                agent = choice.agent
                tried.add(agent.agent_id)
                job = await self.assign(agent, slug, raw, stream=stream, want_usage=want_usage)
                first = await job.next(self.first_chunk_timeout)
                route = Route(slug, choice.reason, choice.candidates, attempts)
                if not isinstance(first, Failure):
                    job.first_at = time.perf_counter()
                    return Attempt(job, first, route)
                job.cancel()
                if stream or first.code != TIMED_OUT:  # a whole reply may take longer than a first token
                    self.witness_failure(agent, job, first, started=False)
                if not first.retryable:
                    return Attempt(job, first, route)
                log.warning(
                    "job failed before output, failing over",
                    extra={"job_id": job.job_id, "agent_id": agent.agent_id, "code": first.code},
                )
                last_failure = first
            price = self.upstream.price
            if (
                self.upstream.serves(slug)
                and routing.admits_upstream(price)
                and (max_price is None or max_price.covers(price))
            ):
                job = self.run_upstream(slug, raw, stream=stream, want_usage=want_usage)
                first = await job.next(self.first_chunk_timeout)
                job.first_at = time.perf_counter()
                return Attempt(job, first, Route(slug, placement.FALLBACK, 0, attempts + 1))
        if last_failure is not None:
            return Attempt(Job("job_none", None, slugs[0]), last_failure, Route(slugs[0], "", 0, attempts))
        return None

    def witness(self, agent: ConnectedAgent, kind: str, detail: str = "", job_id: str | None = None) -> None:
        """Evidence about an agent, for its trust score."""
        if self.trust is not None:
            self.trust.witness(agent, kind, detail, job_id)

    def witness_failure(
        self, agent: ConnectedAgent, job: Job, failure: Failure, *, started: bool, origin: str = ""
    ) -> bool:
        """Evidence from a job that failed (``started``: after output began); whether the agent
        was at fault. A full or draining agent, or a backend refusing the consumer's own request,
        says nothing against it; a silence after output began is a stall, any other failure then
        an abort."""
        if failure.code in (errors.AGENT_BUSY, errors.AGENT_DRAINING) or provider_error(failure)[0] != 502:
            return False
        kind = trust.FAILED
        if started:
            kind = trust.STALLED if failure.code == TIMED_OUT else trust.ABORTED
        self.witness(agent, kind, f"{origin}{failure.code}: {failure.message}", job.job_id)
        return True

    def observe(self, job: Job, completion_tokens: int, *, stream: bool) -> None:
        """Feed a completed job's timings into its agent's moving averages for the model: time to
        first token (streams only: a non-stream reply arrives whole) and generation speed."""
        agent, first_at = job.agent, job.first_at
        if agent is None or first_at is None:
            return
        now = time.perf_counter()
        performance = agent.performance.setdefault(job.slug, Performance())
        if stream:
            generating = now - first_at
            speed = (completion_tokens - 1) / generating if completion_tokens > 1 and generating > 0 else None
            performance.observe((first_at - job.assigned_at) * 1000, speed)
        else:
            total = now - job.assigned_at
            performance.observe(None, completion_tokens / total if completion_tokens > 0 and total > 0 else None)

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
