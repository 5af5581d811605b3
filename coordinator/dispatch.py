"""Job lifecycle: assign to an agent, relay its events, cancel, fail over, fall back.

A job — on an agent or on the upstream — is a queue of :mod:`shared.backend` events that ends with
one ``Done`` or ``Failure``; the chat route reads it the same way whichever side serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from coordinator import placement, trust
from coordinator.metering import Price
from coordinator.placement import Routing
from coordinator.registry import ConnectedAgent, Registry
from coordinator.trust import TrustBook, is_rejection
from coordinator.upstream import Upstream
from shared import errors
from shared.backend import Chunk, Done, Event, Failure
from shared.protocol import JobAssign, JobCancel, JobChunk, JobDone, JobFailed

log = logging.getLogger(__name__)

AGENT_LOST = errors.AGENT_LOST
TIMED_OUT = errors.TIMED_OUT

# Output bytes a job may send when the request sets no budget (verification jobs), and the backlog
# waiting for a consumer at which the agent's socket stops being read until it falls to QUEUE_LOW.
DEFAULT_BUDGET = 1024 * 1024
QUEUE_HIGH = 1024 * 1024
QUEUE_LOW = 256 * 1024
# Seconds a backlog may wait for its consumer before the job is cut (the consumer stopped reading).
DRAIN_TIMEOUT = 10.0
DRAIN_WAKE = 0.5  # how often a wait for the consumer notes that the agent is alive
FAILURE_MESSAGE_CHARS = 500  # an agent's failure message is relayed to the consumer, shortened
# Bytes of output allowed per token of the bound: a streamed chunk's JSON around one token, or with
# logprobs (up to 20 alternatives per token) much more; plus a fixed allowance for the reply's frame.
BYTES_PER_TOKEN = 1024
BYTES_PER_TOKEN_WITH_LOGPROBS = 8192
BUDGET_BASE = 64 * 1024


def output_budget(completion_bound: int, logprobs: bool) -> int:
    """The most output bytes a job may send for a request with this completion bound."""
    return BUDGET_BASE + completion_bound * (BYTES_PER_TOKEN_WITH_LOGPROBS if logprobs else BYTES_PER_TOKEN)


class Job:
    """One attempt at a request, on an agent (``agent`` set) or on the upstream.

    What an agent may send for it is bounded: ``budget`` bytes in all (more is an overrun and ends
    the job), and at most ``QUEUE_HIGH`` bytes waiting for the consumer before the agent's socket
    waits for them to be read (backpressure on that agent alone)."""

    def __init__(
        self,
        job_id: str,
        agent: ConnectedAgent | None,
        slug: str,
        budget: int = DEFAULT_BUDGET,
        *,
        deadline: float = 0.0,
        stop: Callable[[Job], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.agent = agent
        self.slug = slug
        self.budget = budget
        self.received = 0  # bytes of output the agent sent
        self.queued = 0  # bytes of output waiting for the consumer
        self.assigned_at = time.perf_counter()
        self.first_at: float | None = None  # when its first output arrived
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False
        self.drained: asyncio.Event | None = None  # set when a backlog is read down (backpressure)
        self._waiting: asyncio.Timeout | None = None  # the wait a sign of life extends
        self._silence = 0.0
        self._deadline = deadline  # loop time past which no sign of life extends a wait (0: none)
        self._task: asyncio.Task[None] | None = None  # an upstream job's pump
        self._stop = stop  # how an agent's job is stopped (the dispatcher's cancel)

    @property
    def fallback(self) -> bool:
        return self.agent is None

    async def next(self, timeout: float) -> Event:
        """The next event; a ``Failure`` if none comes within ``timeout`` seconds (a
        :meth:`alive` signal from the agent starts the wait again, up to the job's deadline)."""
        if not self.queue.empty():
            return self._took(self.queue.get_nowait())
        self._silence = timeout
        try:
            async with asyncio.timeout(timeout) as waiting:  # no task of its own, unlike wait_for
                self._waiting = waiting
                return self._took(await self.queue.get())
        except TimeoutError:
            return Failure(TIMED_OUT, f"no output for {timeout:g} s", True)
        finally:
            self._waiting = None

    def alive(self) -> None:
        """The agent says it is still working: the current wait starts again (within the deadline)."""
        if self._waiting is not None:
            loop = asyncio.get_running_loop()
            self._waiting.reschedule(min(loop.time() + self._silence, self._deadline or math.inf))

    def ready(self) -> list[Event]:
        """Events already queued, without waiting."""
        events = []
        while not self.queue.empty():
            events.append(self._took(self.queue.get_nowait()))
        return events

    def _took(self, event: Event) -> Event:
        if isinstance(event, Chunk) and self.queued:
            self.queued -= len(event.data)
            if self.drained is not None and self.queued <= QUEUE_LOW:
                self.drained.set()
        return event

    def cancel(self) -> None:
        """Stop the job if it is still running; safe to call at any time, never blocks."""
        if self.finished:
            return
        if self._task is not None:
            self.finished = True
            self._task.cancel()
        elif self._stop is not None:
            self._stop(self)


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
        whole_reply_silence: float | None = None,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.trust_floor = trust_floor
        self.trust = trust
        self.first_chunk_timeout = first_chunk_timeout
        self.whole_reply_silence = whole_reply_silence or first_chunk_timeout
        self.job_deadline = job_deadline
        self._jobs: dict[str, Job] = {}
        self._background: set[asyncio.Task[None]] = set()

    def silence(self, stream: bool) -> float:
        """How long a job may go without a sign of life before it counts as silent: a stream's
        first token may take a long prefill; a whole reply's agent says it is alive meanwhile."""
        return self.first_chunk_timeout if stream else self.whole_reply_silence

    # --- starting --------------------------------------------------------------------------

    async def assign(
        self,
        agent: ConnectedAgent,
        slug: str,
        raw: bytes,
        *,
        stream: bool,
        want_usage: bool,
        budget: int = DEFAULT_BUDGET,
    ) -> Job:
        deadline = asyncio.get_running_loop().time() + self.job_deadline
        job = Job("job_" + secrets.token_hex(8), agent, slug, budget, deadline=deadline, stop=self.cancel)
        self._jobs[job.job_id] = job
        agent.jobs.add(job.job_id)
        agent.in_flight += 1
        agent.share.in_flight += 1
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

    async def start(
        self,
        slugs: list[str],
        raw: bytes,
        *,
        stream: bool,
        want_usage: bool,
        routing: Routing = placement.DEFAULT_ROUTING,
        max_price: Price | None = None,
        budget: int = DEFAULT_BUDGET,
    ) -> Attempt | None:
        """Run the request on the best agent no dearer than ``max_price`` for each model in turn,
        then on the upstream for that model; ``None`` when nobody can take it.

        Until output begins nothing has reached the consumer, so any failure fails over, whatever
        the agent calls it, and counts against the agent. A backend refusing the request itself
        (400/413/422) may be the consumer's doing: the next provider is a second opinion. If it
        refuses too, the refusal is returned and nobody is blamed; if it serves, every agent that
        refused is blamed."""
        tried: set[str] = set()
        refused: list[tuple[ConnectedAgent, Job, Failure]] = []
        last: Attempt | None = None
        attempts = 0
        silence = self.silence(stream)
        for slug in slugs:
            while (
                choice := placement.choose(
                    self.registry, slug, routing, trust_floor=self.trust_floor, exclude=tried, max_price=max_price
                )
            ) is not None:
                attempts += 1
                agent = choice.agent
                tried.add(agent.agent_id)
                job = await self.assign(agent, slug, raw, stream=stream, want_usage=want_usage, budget=budget)
                first = await job.next(silence)
                route = Route(slug, choice.reason, choice.candidates, attempts)
                if not isinstance(first, Failure):
                    job.first_at = time.perf_counter()
                    self._blame(refused)
                    return Attempt(job, first, route)
                job.cancel()
                last = Attempt(job, first, route)
                if is_rejection(first):
                    if refused:  # a second opinion: the request is what they refuse
                        return last
                    refused.append((agent, job, first))
                    continue
                self.witness_failure(agent, job, first, started=False)
                log.warning(
                    "job failed before output, failing over",
                    extra={"job_id": job.job_id, "agent_id": agent.agent_id, "code": first.code},
                )
            price = self.upstream.price
            if (
                self.upstream.serves(slug)
                and routing.admits_upstream(price)
                and (max_price is None or max_price.covers(price))
            ):
                job = self.run_upstream(slug, raw, stream=stream, want_usage=want_usage)
                first = await job.next(self.first_chunk_timeout)
                job.first_at = time.perf_counter()
                if not isinstance(first, Failure) or not is_rejection(first):
                    self._blame(refused)
                return Attempt(job, first, Route(slug, placement.FALLBACK, 0, attempts + 1))
        return last

    def _blame(self, refused: list[tuple[ConnectedAgent, Job, Failure]]) -> None:
        """Another provider served what these agents refused as a bad request: their failure."""
        for agent, job, failure in refused:
            self.witness(
                agent, trust.FAILED, f"refused a request another provider served: {failure.message}", job.job_id
            )

    def witness(self, agent: ConnectedAgent, kind: str, detail: str = "", job_id: str | None = None) -> None:
        """Evidence about an agent, for its trust score."""
        if self.trust is not None:
            self.trust.witness(agent, kind, detail, job_id)

    def witness_failure(
        self, agent: ConnectedAgent, job: Job, failure: Failure, *, started: bool, origin: str = ""
    ) -> bool:
        """Evidence from a job that failed (``started``: after output began); whether the agent
        was at fault. A full or draining agent, a consumer too slow to read, or a backend refusing
        the request (judged by :meth:`start` against a second opinion) says nothing against it;
        output beyond the request's bound is an overrun; a silence after output began is a stall,
        any other failure then an abort."""
        kind = trust.failure_evidence(failure, started=started)
        if kind is None:
            return False
        self.witness(agent, kind, f"{origin}{failure.code}: {failure.message}", job.job_id)
        return True

    # --- events from agents ----------------------------------------------------------------

    def _job_of(self, agent: ConnectedAgent, job_id: str) -> Job | None:
        """The running job ``job_id`` if ``agent`` runs it: nobody speaks for another's job."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.agent is agent else None

    async def on_chunk(self, agent: ConnectedAgent, message: JobChunk) -> bool:
        """Queue a piece of output; ``False`` if the job is not this agent's (or is over). Past the
        job's budget the job ends as an overrun; past ``QUEUE_HIGH`` bytes waiting for the consumer,
        this agent's socket waits until they are read."""
        job = self._job_of(agent, message.job_id)
        if job is None:
            return False
        size = len(message.data)
        job.received += size
        if job.received > job.budget:
            self._overrun(job, f"sent {job.received} bytes of output, the request allows {job.budget}")
            return True
        job.queued += size
        job.queue.put_nowait(Chunk(message.data))
        if job.queued > QUEUE_HIGH:
            await self._drain(agent, job)
        return True

    async def _drain(self, agent: ConnectedAgent, job: Job) -> None:
        """Wait for the consumer to read the job's backlog; cut the job if it does not in time."""
        job.drained = drained = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        try:
            while job.queued > QUEUE_LOW and not job.finished:
                agent.last_seen = time.monotonic()  # we stopped reading the agent; it did not go silent
                if loop.time() >= deadline:
                    log.info("consumer not reading, cutting the job", extra={"job_id": job.job_id})
                    self._finish(job, Failure(errors.CONSUMER_TOO_SLOW, "the consumer stopped reading", False))
                    self._send_cancel_soon(job)
                    return
                drained.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DRAIN_WAKE):
                        await drained.wait()
        finally:
            job.drained = None

    def on_done(self, agent: ConnectedAgent, message: JobDone) -> bool:
        job = self._job_of(agent, message.job_id)
        if job is None:
            return False
        job.received += sum(len(chunk) for chunk in message.tail)
        if job.received > job.budget:
            self._overrun(job, f"sent {job.received} bytes of output, the request allows {job.budget}")
        else:
            self._finish(job, Done(message.usage, message.finish_reason, message.tail))
        return True

    def on_failed(self, agent: ConnectedAgent, message: JobFailed) -> bool:
        job = self._job_of(agent, message.job_id)
        if job is None:
            return False
        text = message.message[:FAILURE_MESSAGE_CHARS]
        self._finish(job, Failure(message.code[:64], text, message.retryable, message.status))
        return True

    def on_progress(self, agent: ConnectedAgent, job_id: str) -> bool:
        job = self._job_of(agent, job_id)
        if job is None:
            return False
        job.alive()
        return True

    def _overrun(self, job: Job, detail: str) -> None:
        log.warning("job overran its budget, cutting it", extra={"job_id": job.job_id, "bytes": job.received})
        self._finish(job, Failure(errors.OUTPUT_OVERRUN, detail, False))
        self._send_cancel_soon(job)

    def agent_lost(self, agent: ConnectedAgent, reason: str) -> None:
        """Fail every job of a lost agent; callers waiting for a first event fail over."""
        for job_id in list(agent.jobs):
            job = self._jobs.get(job_id)
            if job is not None:
                self._finish(job, Failure(AGENT_LOST, f"provider agent lost: {reason}", True))

    def cancel(self, job: Job) -> None:
        """Tell the agent to stop ``job`` and free its slot (fire and forget)."""
        self._finish(job, None)
        self._send_cancel_soon(job)

    def _send_cancel_soon(self, job: Job) -> None:
        agent = job.agent
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
            job.agent.share.in_flight = max(0, job.agent.share.in_flight - 1)
        if last is not None:
            job.queue.put_nowait(last)
        if job.drained is not None:
            job.drained.set()


def provider_error(failure: Failure) -> tuple[int, str, str]:
    """HTTP status, code and message for a failure that reaches the consumer: a backend refusing
    the request itself (400/413/422) is the consumer's error, anything else the provider's."""
    if failure.code == errors.BACKEND_REJECTED and failure.status in (400, 413, 422):
        return (413 if failure.status == 413 else 400), errors.INVALID_REQUEST, failure.message
    return 502, errors.PROVIDER_ERROR, f"The provider failed: {failure.message}"
