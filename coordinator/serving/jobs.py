"""The job table: which agent runs which job, and what each job may still send. No I/O.

A job — on an agent or on the upstream — is a queue of :mod:`shared.backend` events that ends with
one ``Done`` or ``Failure``; whoever started it reads it the same way whichever side serves it.

:class:`JobTable` takes the agent's frames and the time as arguments and answers with what to send
the agent (a :class:`Reply`) and the events it queued on the job; sending, waiting and choosing an
agent are :class:`coordinator.serving.dispatch.Dispatcher`'s, so the table is tested without sockets.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.market.registry import ConnectedAgent
from shared import errors
from shared.backend import Chunk, Done, Event, Failure
from shared.protocol import CHAT, JobAssign, JobCancel, JobChunk, JobDone, JobFailed

# Output bytes a job may send when the request sets no budget (verification jobs), and the backlog
# waiting for a consumer at which the agent's socket stops being read until it falls to QUEUE_LOW.
DEFAULT_BUDGET = 1024 * 1024
QUEUE_HIGH = 1024 * 1024
QUEUE_LOW = 256 * 1024
FAILURE_MESSAGE_CHARS = 500  # an agent's failure message is relayed to the consumer, shortened
# Bytes of output allowed per token of the bound: a streamed chunk's JSON around one token, or with
# logprobs (up to 20 alternatives per token) much more; plus a fixed allowance for the reply's frame.
BYTES_PER_TOKEN = 1024
BYTES_PER_TOKEN_WITH_LOGPROBS = 8192
BUDGET_BASE = 64 * 1024


def output_budget(completion_bound: int, logprobs: bool) -> int:
    """The most output bytes a job may send for a request with this completion bound."""
    return BUDGET_BASE + completion_bound * (BYTES_PER_TOKEN_WITH_LOGPROBS if logprobs else BYTES_PER_TOKEN)


def new_job_id() -> str:
    return "job_" + secrets.token_hex(8)


class Job:
    """One attempt at a request, on an agent (``agent`` set) or on the upstream: its reader's end.

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
        self._stop = stop  # how the job is stopped (the dispatcher's cancel, or its upstream pump's)
        # A job another replica's consumer reads (the job relay): its events go there as they come,
        # ``None`` for a sign of life, instead of into the queue.
        self.forward: Callable[[Event | None], None] | None = None
        self.relayed = 0  # chunks relayed from the replica holding its agent (the next one's number)

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
            return Failure(errors.TIMED_OUT, f"no output for {timeout:g} s", True)
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
        if not self.finished and self._stop is not None:
            self._stop(self)


@dataclass(frozen=True)
class Reply:
    """What the table makes of a frame from an agent: whether the job was this agent's to speak
    for (``known``), what to send the agent, the failure the job was cut with (an overrun), and the
    job whose backlog the agent's socket must now wait for (``backlog``)."""

    known: bool
    send: tuple[JobCancel, ...] = ()
    cut: Failure | None = None
    backlog: Job | None = None


IGNORED = Reply(False)
TAKEN = Reply(True)


class JobTable:
    """The running agent jobs, keyed by id; each frame and each stop goes through here."""

    def __init__(self, job_deadline: float) -> None:
        self.job_deadline = job_deadline
        self._jobs: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def open(
        self,
        agent: ConnectedAgent,
        slug: str,
        raw: bytes,
        *,
        stream: bool,
        want_usage: bool,
        budget: int,
        now: float,
        loop_now: float,
        stop: Callable[[Job], None] | None = None,
        request_id: str = "",
        kind: str = CHAT,
    ) -> tuple[Job, JobAssign]:
        """A new job of ``agent``'s, counted against its capacity, and the message that assigns it
        (``now``: wall time, for the agent's deadline; ``loop_now``: the loop's, for the reader's)."""
        job = Job(new_job_id(), agent, slug, budget, deadline=loop_now + self.job_deadline, stop=stop)
        self._count(job)
        message = JobAssign(
            job_id=job.job_id,
            model=slug,
            backend_model=agent.models[slug].backend_model,
            request=raw,
            stream=stream,
            want_usage=want_usage,
            deadline=now + self.job_deadline,
            request_id=request_id,
            kind=kind,
        )
        return job, message

    def adopt(
        self,
        agent: ConnectedAgent,
        assign: JobAssign,
        forward: Callable[[Event | None], None],
        *,
        budget: int,
        loop_now: float,
        stop: Callable[[Job], None] | None = None,
    ) -> Job | None:
        """A job another replica placed on ``agent`` (the job relay), counted here, where the
        agent's slots are decided; its events go to ``forward``. ``None`` if the id is taken."""
        if assign.job_id in self._jobs:
            return None
        job = Job(assign.job_id, agent, assign.model, budget, deadline=loop_now + self.job_deadline, stop=stop)
        job.forward = forward
        self._count(job)
        return job

    def _count(self, job: Job) -> None:
        assert job.agent is not None
        self._jobs[job.job_id] = job
        job.agent.jobs.add(job.job_id)
        job.agent.in_flight += 1
        job.agent.share.in_flight += 1

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def _job_of(self, agent: ConnectedAgent, job_id: str) -> Job | None:
        """The running job ``job_id`` if ``agent`` runs it: nobody speaks for another's job."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.agent is agent else None

    def chunk(self, agent: ConnectedAgent, message: JobChunk) -> Reply:
        """Queue a piece of output. Past the job's budget the job ends as an overrun; past
        ``QUEUE_HIGH`` bytes waiting for the consumer, the agent must wait until they are read."""
        job = self._job_of(agent, message.job_id)
        if job is None:
            return IGNORED
        size = len(message.data)
        job.received += size
        if job.received > job.budget:
            return self._overrun(job)
        if job.forward is not None:
            job.forward(Chunk(message.data))
            return TAKEN
        job.queued += size
        job.queue.put_nowait(Chunk(message.data))
        return Reply(True, backlog=job) if job.queued > QUEUE_HIGH else TAKEN

    def done(self, agent: ConnectedAgent, message: JobDone) -> Reply:
        job = self._job_of(agent, message.job_id)
        if job is None:
            return IGNORED
        job.received += sum(len(chunk) for chunk in message.tail)
        if job.received > job.budget:
            return self._overrun(job)
        self.finish(job, Done(message.usage, message.finish_reason, message.tail))
        return TAKEN

    def failed(self, agent: ConnectedAgent, message: JobFailed) -> Reply:
        job = self._job_of(agent, message.job_id)
        if job is None:
            return IGNORED
        text = message.message[:FAILURE_MESSAGE_CHARS]
        self.finish(job, Failure(message.code[:64], text, message.retryable, message.status))
        return TAKEN

    def progress(self, agent: ConnectedAgent, job_id: str) -> Reply:
        job = self._job_of(agent, job_id)
        if job is None:
            return IGNORED
        job.alive()
        if job.forward is not None:
            job.forward(None)
        return TAKEN

    def _overrun(self, job: Job) -> Reply:
        detail = f"sent {job.received} bytes of output, the request allows {job.budget}"
        failure = Failure(errors.OUTPUT_OVERRUN, detail, False)
        return Reply(True, self.cut(job, failure), cut=failure)

    @staticmethod
    def backlogged(job: Job) -> bool:
        """Whether the agent must still wait for ``job``'s consumer to read its backlog."""
        return job.queued > QUEUE_LOW and not job.finished

    def cut(self, job: Job, failure: Failure) -> tuple[JobCancel, ...]:
        """End ``job`` with ``failure`` for its reader; the message that stops the agent."""
        running = not job.finished
        self.finish(job, failure)
        return (JobCancel(job_id=job.job_id),) if running and job.agent is not None else ()

    def cancel(self, job: Job) -> tuple[JobCancel, ...]:
        """End ``job`` without a last event (its reader stopped reading); the message that stops the agent."""
        running = not job.finished
        self.finish(job, None)
        return (JobCancel(job_id=job.job_id),) if running and job.agent is not None else ()

    def lost(self, agent: ConnectedAgent, reason: str, code: str = errors.AGENT_LOST) -> None:
        """Fail every job of a lost agent; readers waiting for a first event fail over."""
        for job_id in list(agent.jobs):
            job = self._jobs.get(job_id)
            if job is not None:
                self.finish(job, Failure(code, f"provider agent lost: {reason}", True))

    def finish(self, job: Job, last: Event | None) -> None:
        """End ``job`` once: free the agent's slot, queue ``last`` for the reader, wake a waiting agent."""
        if job.finished:
            return
        job.finished = True
        self._jobs.pop(job.job_id, None)
        if job.agent is not None:
            job.agent.jobs.discard(job.job_id)
            job.agent.in_flight = max(0, job.agent.in_flight - 1)
            job.agent.share.in_flight = max(0, job.agent.share.in_flight - 1)
        if last is not None:
            if job.forward is not None:
                job.forward(last)
            else:
                job.queue.put_nowait(last)
        if job.drained is not None:
            job.drained.set()
