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

Messages to one replica go out in order on one connection (:meth:`Cluster.send`); a message lost
with Redis shows as a job that fails over (before output) or ends with an error (after).
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

    def channel(self, replica: str) -> str:
        return self.cluster.key("relay", replica)

    def start(self) -> None:
        self.cluster.listen(self.channel(self.replica), self._received)
        self.trust.forward = self.report_evidence

    def link(self, replica: str, agent_id: str) -> RemoteLink:
        return RemoteLink(self, replica, agent_id)

    def _send(self, replica: str, message: RelayMessage) -> bool:
        return self.cluster.send(self.channel(replica), _encoder.encode(message))

    # --- this replica's consumers, another replica's agents ---------------------------------

    def assign(self, replica: str, agent_id: str, message: JobAssign) -> None:
        job = self.dispatcher.table.get(message.job_id)  # opened here before it is sent
        budget = job.budget if job is not None else 0
        if not self._send(replica, Assign(self.replica, agent_id, budget, message)):
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
                failed = JobFailed(job_id=job_id, code=errors.AGENT_BUSY, message=why, retryable=True)
                self._send(origin, Frame(failed))
                return
            log.debug("relayed job started", extra={"job_id": job_id, "origin": origin, "agent_id": agent.agent_id})
            self._origins[job_id] = origin
        finally:
            logs.request_id.reset(context)

    def _forwarder(self, job_id: str, origin: str, request_id: str) -> Callable[[Event | None], None]:
        def forward(event: Event | None) -> None:
            if isinstance(event, Failure):
                context = logs.request_id.set(request_id or None)
                log.info("relayed job failed", extra={"job_id": job_id, "origin": origin, "code": event.code})
                logs.request_id.reset(context)
            frame: JobChunk | JobDone | JobFailed | JobProgress
            if event is None:
                frame = JobProgress(job_id=job_id)
            elif isinstance(event, Chunk):
                frame = JobChunk(job_id=job_id, seq=0, data=event.data)
            elif isinstance(event, Done):
                frame = JobDone(job_id=job_id, usage=event.usage, finish_reason=event.finish_reason, tail=event.tail)
            else:
                assert isinstance(event, Failure)
                frame = JobFailed(job_id, event.code, event.message, event.retryable, event.status)
            if not isinstance(frame, (JobChunk, JobProgress)):
                self._origins.pop(job_id, None)
            self._send(origin, Frame(frame))

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
