"""The job relay: a consumer on replica B served by an agent connected to replica A.

B places the job on its mirror copy of A's agent (:mod:`coordinator.market.mirror`); the copy's
link is a :class:`RemoteLink`, so B's dispatcher sends the ``JobAssign`` as to any agent and the
message goes to A's channel (``{prefix}relay:{A}``) as an :class:`Assign`. A is the authority on its
agents' slots: a job for an agent that has no free slot (or has left) is refused at once with
``agent_busy`` and B places it elsewhere, so an agent is never double-booked and nobody waits.
Otherwise A opens the job in its own table and sends each event back to B's channel as a
:class:`Frame` carrying the protocol's own ``job.*`` message; B's table takes it as if the agent
had sent it. B's ``job.cancel`` (the consumer left, an overrun) goes to A the same way.

Trust evidence and timings B observes about A's agent go to A as a :class:`Report`: A holds the
agent's standing, and publishes the new score with the agent's card.

Messages to one replica go out in order on one connection (:meth:`Cluster.send`). A message lost
with Redis ends its job with ``relay_lost``, which blames nobody: an ``Assign`` that could not be
sent fails over at once; a frame the holder could not send cancels the job there and the placing
replica is told once Redis answers; chunks are numbered, so a hole ends the job; and after the
listener had to subscribe again (what was published meanwhile is lost) every relayed job ends. A
replica that leaves the mirror (killed) takes the jobs relayed through it: its consumers' jobs on
agents here are cancelled, and jobs here on its agents fail over or end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from coordinator.core.cluster import Cluster
from coordinator.market.registry import ConnectedAgent, Performance, Registry
from coordinator.serving.dispatch import Dispatcher
from coordinator.trust.scores import WEIGHTS, Evidence, TrustBook
from shared import errors, logs
from shared.backend import Chunk, Done, Event, Failure
from shared.protocol import JobAssign, JobCancel, JobChunk, JobDone, JobFailed, JobProgress, Message

log = logging.getLogger(__name__)


class Assign(msgspec.Struct, tag="assign", array_like=True):
    origin: str  # the replica whose consumer reads the job
    agent_id: str
    budget: int
    job: JobAssign


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    origin: str
    job_id: str


class Frame(msgspec.Struct, tag="frame", array_like=True):
    frame: JobChunk | JobDone | JobFailed | JobProgress


class Report(msgspec.Struct, tag="report", array_like=True):
    """What B saw of a job of A's agent: a piece of trust evidence, or its timings on a model."""

    agent_id: str
    token_id: int
    user_id: int
    job_id: str | None
    kind: str = ""  # trust evidence kind (empty: timings only)
    detail: str = ""
    slug: str = ""
    ttft_ms: float | None = None
    tokens_per_s: float | None = None


RelayMessage = Assign | Cancel | Frame | Report
_decoder = msgspec.msgpack.Decoder(RelayMessage)
_encoder = msgspec.msgpack.Encoder()


MAX_UNDELIVERED = 10_000  # jobs whose end waits for Redis to be told; past it the origin's timeouts tell


class Unreachable(ConnectionError):
    """The replica holding the agent cannot be told (Redis is away)."""


class RemoteLink:
    """How this replica talks to an agent connected to another: through that replica's channel."""

    def __init__(self, relay: Relay, replica: str, agent_id: str) -> None:
        self.relay = relay
        self.replica = replica
        self.agent_id = agent_id

    def send(self, message: Message) -> Awaitable[None]:
        if isinstance(message, JobAssign):
            self.relay.assign(self.replica, self.agent_id, message)
        elif isinstance(message, JobCancel):
            self.relay.cancel(self.replica, message.job_id)
        return _done()

    def close(self, code: int, reason: str) -> Awaitable[None]:
        return _done()  # the replica holding it closes it

    def close_soon(self, code: int, reason: str) -> None:
        return None


async def _done() -> None:
    return None


class Relay:
    def __init__(self, cluster: Cluster, replica: str, registry: Registry, dispatcher: Dispatcher, trust: TrustBook):
        self.cluster = cluster
        self.replica = replica
        self.registry = registry
        self.dispatcher = dispatcher
        self.trust = trust
        self._origins: dict[str, str] = {}  # job id -> replica reading it, for jobs run here for others
        self._undelivered: dict[str, str] = {}  # job id -> its replica, which must be told the job ended
        self._subscriptions = 0  # the listener's subscriptions seen so far

    def channel(self, replica: str) -> str:
        return self.cluster.key("relay", replica)

    def start(self) -> None:
        self.cluster.listen(self.channel(self.replica), self._received)
        self.cluster.on_connected(self._reconnected)
        self.trust.forward = self.report_evidence

    async def _reconnected(self) -> None:
        """Redis answers again: tell the replicas whose jobs ended unheard; if the listener had to
        subscribe again, frames for the jobs relayed to this replica may be lost: end them."""
        undelivered, self._undelivered = self._undelivered, {}
        for job_id, origin in undelivered.items():
            why = "the coordinator holding the agent lost touch with yours"
            self._send(origin, Frame(JobFailed(job_id, errors.RELAY_LOST, why, True)))
        resubscribed = self._subscriptions and self.cluster.subscriptions != self._subscriptions
        self._subscriptions = self.cluster.subscriptions
        if resubscribed:
            for agent in self.registry.agents():
                for job_id in list(agent.jobs) if not agent.local else ():
                    self.dispatcher.relay_lost(job_id, "lost touch with the coordinator holding the agent")

    @property
    def relayed(self) -> int:
        """Jobs running here for other replicas' consumers."""
        return len(self._origins)

    def origin_gone(self, replica: str) -> None:
        """A replica left the mirror (killed, or cut off): nobody reads its jobs on our agents."""
        for job_id, origin in list(self._origins.items()):
            if origin == replica:
                del self._origins[job_id]
                if (job := self.dispatcher.table.get(job_id)) is not None:
                    self.dispatcher.cancel(job)

    def link(self, replica: str, agent_id: str) -> RemoteLink:
        return RemoteLink(self, replica, agent_id)

    def _send(self, replica: str, message: RelayMessage, dropped: Callable[[], None] | None = None) -> bool:
        return self.cluster.send(self.channel(replica), _encoder.encode(message), dropped)

    # --- this replica's consumers, another replica's agents ---------------------------------

    def assign(self, replica: str, agent_id: str, message: JobAssign) -> None:
        job = self.dispatcher.table.get(message.job_id)  # opened here before it is sent
        budget = job.budget if job is not None else 0
        job_id = message.job_id

        def dropped() -> None:
            self.dispatcher.relay_lost(job_id, "the job could not be sent to the coordinator holding the agent")

        if not self._send(replica, Assign(self.replica, agent_id, budget, message), dropped):
            raise Unreachable(f"replica {replica} unreachable")

    def cancel(self, replica: str, job_id: str) -> None:
        self._send(replica, Cancel(self.replica, job_id))

    def report_evidence(self, agent: ConnectedAgent, kind: str, detail: str, job_id: str | None) -> None:
        """Evidence about another replica's agent: that replica counts it (and writes it)."""
        if agent.replica is None:
            return
        report = Report(agent.agent_id, agent.token_id, agent.user_id, job_id, kind=kind, detail=detail)
        if not self._send(agent.replica, report):  # nobody to tell: written here, read when it next loads
            self.trust.record(Evidence(agent.token_id, agent.user_id, kind, time.time(), detail=detail, job_id=job_id))

    def report_timings(
        self, agent: ConnectedAgent, slug: str, ttft_ms: float | None, tokens_per_s: float | None
    ) -> None:
        if agent.replica is not None:
            report = Report(
                agent.agent_id,
                agent.token_id,
                agent.user_id,
                None,
                slug=slug,
                ttft_ms=ttft_ms,
                tokens_per_s=tokens_per_s,
            )
            self._send(agent.replica, report)

    # --- what arrives on this replica's channel ---------------------------------------------

    def _received(self, data: bytes) -> None:
        message = _decoder.decode(data)
        if isinstance(message, Frame):
            self.dispatcher.relayed(message.frame)
        elif isinstance(message, Assign):
            self._adopt(message)
        elif isinstance(message, Cancel):
            job = self.dispatcher.table.get(message.job_id)
            if job is not None and self._origins.get(message.job_id) == message.origin:
                del self._origins[message.job_id]
                self.dispatcher.cancel(job)
        else:
            self._report(message)

    def _adopt(self, message: Assign) -> None:
        """Run another replica's job on an agent of ours, or refuse it at once (no free slot)."""
        job_id, origin, request_id = message.job.job_id, message.origin, message.job.request_id
        agent = self.registry.get(message.agent_id)
        context = logs.request_id.set(request_id or None)  # this replica's log lines about it carry it too
        try:
            forward = self._forwarder(job_id, origin, request_id)
            if agent is None or not self.dispatcher.adopt(agent, message.job, message.budget, forward):
                why = "the agent left" if agent is None else "the agent has no free slot"
                log.info("relayed job refused", extra={"job_id": job_id, "origin": origin, "why": why})
                if agent is not None:  # the origin's copy thought it free: publish it as it is
                    self.registry.changed(agent)
                failed = JobFailed(job_id=job_id, code=errors.AGENT_BUSY, message=why, retryable=True)
                self._send(origin, Frame(failed))
                return
            log.debug("relayed job started", extra={"job_id": job_id, "origin": origin, "agent_id": agent.agent_id})
            self._origins[job_id] = origin
        finally:
            logs.request_id.reset(context)

    def _forwarder(self, job_id: str, origin: str, request_id: str) -> Callable[[Event | None], None]:
        chunks = 0

        def undelivered() -> None:
            """A frame could not be sent: stop the job here, tell the origin when Redis answers."""
            if self._origins.pop(job_id, None) is not None and (job := self.dispatcher.table.get(job_id)) is not None:
                self.dispatcher.cancel(job)
            if len(self._undelivered) < MAX_UNDELIVERED:
                self._undelivered[job_id] = origin

        def forward(event: Event | None) -> None:
            nonlocal chunks
            if isinstance(event, Failure):
                context = logs.request_id.set(request_id or None)
                log.info("relayed job failed", extra={"job_id": job_id, "origin": origin, "code": event.code})
                logs.request_id.reset(context)
            frame: JobChunk | JobDone | JobFailed | JobProgress
            if event is None:
                frame = JobProgress(job_id=job_id)
            elif isinstance(event, Chunk):
                frame = JobChunk(job_id=job_id, seq=chunks, data=event.data)
                chunks += 1
            elif isinstance(event, Done):
                frame = JobDone(job_id=job_id, usage=event.usage, finish_reason=event.finish_reason, tail=event.tail)
            else:
                assert isinstance(event, Failure)
                frame = JobFailed(job_id, event.code, event.message, event.retryable, event.status)
            if not isinstance(frame, (JobChunk, JobProgress)):
                self._origins.pop(job_id, None)
            if not self._send(origin, Frame(frame), undelivered):
                undelivered()

        return forward

    def _report(self, report: Report) -> None:
        agent = self.registry.get(report.agent_id)
        if report.kind not in WEIGHTS and report.kind:
            return
        if report.kind:
            if agent is not None and agent.local:
                self.trust.witness(agent, report.kind, report.detail, report.job_id)
            else:
                evidence = Evidence(
                    report.token_id,
                    report.user_id,
                    report.kind,
                    time.time(),
                    detail=report.detail,
                    job_id=report.job_id,
                )
                self.trust.record(evidence)  # its agent left: written, read when its token next loads
        elif agent is not None and agent.local and report.slug in agent.models:
            agent.performance.setdefault(report.slug, Performance()).observe(report.ttft_ms, report.tokens_per_s)
            agent.share.changed()
