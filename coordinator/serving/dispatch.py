"""Running requests on agents: placement with failover, the upstream fallback, and the sender
around the job table (:mod:`coordinator.serving.jobs`) that carries its messages to agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from coordinator.market import placement
from coordinator.market.placement import Routing
from coordinator.market.registry import ConnectedAgent, Registry
from coordinator.market.upstream import Upstream
from coordinator.money.metering import Price
from coordinator.serving.jobs import DEFAULT_BUDGET, Job, JobTable, Reply, new_job_id
from coordinator.trust.scores import TrustBook, is_rejection
from shared import errors, logs
from shared.backend import Event, Failure
from shared.protocol import CHAT, JobAssign, JobCancel, JobChunk, JobDone, JobFailed, JobProgress

log = logging.getLogger(__name__)

# Seconds a backlog may wait for its consumer before the job is cut (the consumer stopped reading),
# and how often a wait for the consumer notes that the agent is alive.
DRAIN_TIMEOUT = 10.0
DRAIN_WAKE = 0.5


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
    """Starts jobs on agents (placement, failover, then the upstream) and is the job table's sender:
    it carries the table's messages to agents and makes an agent's socket wait for a slow consumer."""

    def __init__(
        self,
        registry: Registry,
        upstream: Upstream,
        first_chunk_timeout: float,
        job_deadline: float,
        trust_floor: float = 0.0,
        trust: TrustBook | None = None,
        whole_reply_silence: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        drain_timeout: float = DRAIN_TIMEOUT,
        drain_wake: float = DRAIN_WAKE,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.trust_floor = trust_floor
        self.trust = trust
        self.first_chunk_timeout = first_chunk_timeout
        self.whole_reply_silence = whole_reply_silence or first_chunk_timeout
        self.table = JobTable(job_deadline)
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.drain_wake = drain_wake
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
        kind: str = CHAT,
    ) -> Job:
        job, message = self.table.open(
            agent,
            slug,
            raw,
            stream=stream,
            want_usage=want_usage,
            budget=budget,
            now=time.time(),
            loop_now=asyncio.get_running_loop().time(),
            stop=self.cancel,
            request_id=logs.request_id.get() or "",  # the agent logs it with the job
            kind=kind,
        )
        try:
            await agent.link.send(message)
        except Exception as exc:  # the socket died under us: same as losing the agent
            if agent.local:
                self.table.finish(job, Failure(errors.AGENT_LOST, f"agent unreachable: {exc}", True))
            else:  # the replica holding it is out of reach: not the agent's doing
                self.table.finish(job, Failure(errors.AGENT_BUSY, f"agent's coordinator unreachable: {exc}", True))
        return job

    def adopt(
        self, agent: ConnectedAgent, assign: JobAssign, budget: int, forward: Callable[[Event | None], None]
    ) -> bool:
        """Run a job another replica placed on ``agent`` (connected here), sending its events to
        ``forward``; ``False`` if the agent has no free slot for it: this replica decides that."""
        offer = agent.models.get(assign.model)
        if not agent.local or agent.free_slots <= 0 or offer is None or not offer.serves(assign.kind):
            return False
        loop_now = asyncio.get_running_loop().time()
        job = self.table.adopt(agent, assign, forward, budget=budget, loop_now=loop_now, stop=self.cancel)
        if job is None:
            return False
        assign.backend_model = agent.models[assign.model].backend_model
        task = asyncio.create_task(self._hand_over(job, assign))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _hand_over(self, job: Job, assign: JobAssign) -> None:
        assert job.agent is not None
        try:
            await job.agent.link.send(assign)
        except Exception as exc:
            self.table.finish(job, Failure(errors.AGENT_LOST, f"agent unreachable: {exc}", True))

    def relayed(self, frame: JobChunk | JobDone | JobFailed | JobProgress) -> None:
        """A frame the replica holding a remote agent relayed for one of this replica's jobs on it.
        Backpressure stops at the relay: what a slow consumer has not read waits here, within the
        job's output budget."""
        job = self.table.get(frame.job_id)
        if job is None or job.agent is None or job.agent.local:
            return
        agent = job.agent
        if isinstance(frame, JobChunk):
            if frame.seq != job.relayed:  # one went missing between the replicas: the output has a hole
                self.relay_lost(job.job_id, f"chunk {job.relayed} of the job was lost between coordinators")
                return
            job.relayed += 1
            self._carry_out(agent, self.table.chunk(agent, frame))
        elif isinstance(frame, JobDone):
            self._carry_out(agent, self.table.done(agent, frame))
        elif isinstance(frame, JobFailed):
            self._carry_out(agent, self.table.failed(agent, frame))
        else:
            self.table.progress(agent, frame.job_id)

    def run_upstream(self, slug: str, raw: bytes, *, stream: bool, want_usage: bool, kind: str = CHAT) -> Job:
        events = self.upstream.run(slug, raw, stream=stream, want_usage=want_usage, kind=kind)

        def stop(job: Job) -> None:
            job.finished = True
            pump.cancel()

        job = Job(new_job_id(), None, slug, stop=stop)
        pump = asyncio.create_task(self._pump(job, events))
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
                job = await self.assign(
                    agent, slug, raw, stream=stream, want_usage=want_usage, budget=budget, kind=routing.kind
                )
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
                if self.trust is not None:
                    self.trust.witness_failure(agent, first, started=False, job_id=job.job_id)
                log.warning(
                    "job failed before output, failing over",
                    extra={"job_id": job.job_id, "agent_id": agent.agent_id, "code": first.code},
                )
            price = self.upstream.price_for(slug)
            if (
                self.upstream.serves(slug, routing.kind)
                and routing.admits_upstream(price)
                and (max_price is None or max_price.covers(price))
            ):
                job = self.run_upstream(slug, raw, stream=stream, want_usage=want_usage, kind=routing.kind)
                first = await job.next(self.first_chunk_timeout)
                job.first_at = time.perf_counter()
                if not isinstance(first, Failure) or not is_rejection(first):
                    self._blame(refused)
                return Attempt(job, first, Route(slug, placement.FALLBACK, 0, attempts + 1))
        return last

    def _blame(self, refused: list[tuple[ConnectedAgent, Job, Failure]]) -> None:
        """Another provider served what these agents refused as a bad request: their failure."""
        if self.trust is not None:
            for agent, job, failure in refused:
                self.trust.witness_refusal(agent, failure, job.job_id)

    # --- frames from agents: the table decides, the sender carries out ----------------------

    async def on_chunk(self, agent: ConnectedAgent, message: JobChunk) -> bool:
        """Queue a piece of output; ``False`` if the job is not this agent's (or is over). A job
        whose consumer has ``QUEUE_HIGH`` bytes unread makes this agent's socket wait for it."""
        reply = self._carry_out(agent, self.table.chunk(agent, message))
        if reply.backlog is not None:
            await self._drain(agent, reply.backlog)
        return reply.known

    def on_done(self, agent: ConnectedAgent, message: JobDone) -> bool:
        return self._carry_out(agent, self.table.done(agent, message)).known

    def on_failed(self, agent: ConnectedAgent, message: JobFailed) -> bool:
        return self._carry_out(agent, self.table.failed(agent, message)).known

    def on_progress(self, agent: ConnectedAgent, job_id: str) -> bool:
        return self.table.progress(agent, job_id).known

    def agent_lost(self, agent: ConnectedAgent, reason: str) -> None:
        """Fail every job of a lost agent; callers waiting for a first event fail over. Another
        replica's agent that leaves this one's mirror may be well: its replica or Redis went away."""
        self.table.lost(agent, reason, errors.AGENT_LOST if agent.local else errors.RELAY_LOST)

    def relay_lost(self, job_id: str, why: str) -> None:
        """A relayed job's messages were lost between replicas: it ends here, blaming nobody."""
        job = self.table.get(job_id)
        if job is not None:
            self._send_soon(job.agent, self.table.cut(job, Failure(errors.RELAY_LOST, why, True)))

    def cancel(self, job: Job) -> None:
        """Tell the agent to stop ``job`` and free its slot (fire and forget)."""
        self._send_soon(job.agent, self.table.cancel(job))

    def _carry_out(self, agent: ConnectedAgent, reply: Reply) -> Reply:
        if reply.cut is not None:
            log.warning(
                "job cut", extra={"agent_id": agent.agent_id, "code": reply.cut.code, "detail": reply.cut.message}
            )
        self._send_soon(agent, reply.send)
        return reply

    async def _drain(self, agent: ConnectedAgent, job: Job) -> None:
        """Wait for the consumer to read the job's backlog; cut the job if it does not in time."""
        job.drained = drained = asyncio.Event()
        deadline = self.clock() + self.drain_timeout
        try:
            while self.table.backlogged(job):
                agent.last_seen = time.monotonic()  # we stopped reading the agent; it did not go silent
                if self.clock() >= deadline:
                    log.info("consumer not reading, cutting the job", extra={"job_id": job.job_id})
                    failure = Failure(errors.CONSUMER_TOO_SLOW, "the consumer stopped reading", False)
                    self._send_soon(agent, self.table.cut(job, failure))
                    return
                drained.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.drain_wake):
                        await drained.wait()
        finally:
            job.drained = None

    def _send_soon(self, agent: ConnectedAgent | None, messages: tuple[JobCancel, ...]) -> None:
        """Send ``messages`` to ``agent`` in the background, if it is still connected."""
        if agent is None or not messages or self.registry.get(agent.agent_id) is not agent:
            return
        for message in messages:
            task = asyncio.create_task(self._send(agent, message))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send(self, agent: ConnectedAgent, message: JobCancel) -> None:
        try:
            await agent.link.send(message)
        except Exception as exc:
            log.info("could not send job.cancel", extra={"job_id": message.job_id, "error": str(exc)})
