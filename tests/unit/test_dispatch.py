"""The dispatcher as the job table's sender, with a fake agent link: the table's messages reach the
agent, and a slow consumer makes the agent's socket wait, then has its own job cut."""

from __future__ import annotations

import asyncio

from coordinator.market.registry import ConnectedAgent, Registry
from coordinator.market.upstream import Upstream
from coordinator.serving import jobs
from coordinator.serving.dispatch import Dispatcher
from coordinator.serving.jobs import Job
from shared import errors
from shared.backend import Failure
from shared.protocol import JobAssign, JobCancel, JobChunk, ModelOffer
from tests.waiting import eventually_async


class _Outbox:
    """The agent's end of the socket, as the dispatcher sees it: what was sent to it."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    async def send(self, message: object) -> None:
        self.sent.append(message)

    async def close(self, code: int, reason: str) -> None:
        self.sent.append(("close", code))

    def close_soon(self, code: int, reason: str) -> None:
        self.sent.append(("close", code))


class _Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _job_on_an_agent(budget: int, clock: _Clock | None = None) -> tuple[Dispatcher, ConnectedAgent, Job, _Outbox]:
    registry = Registry()
    outbox = _Outbox()
    agent = ConnectedAgent("agt_x", 1, 1, {"m": ModelOffer("m", "m", 1, 1)}, 4, outbox, 0.0)
    registry.add(agent)
    dispatcher = Dispatcher(
        registry, Upstream(None, None, {}, 5.0), 5.0, 60.0, clock=clock or _Clock(), drain_wake=0.01
    )
    job = await dispatcher.assign(agent, "m", b"{}", stream=True, want_usage=False, budget=budget)
    return dispatcher, agent, job, outbox


async def test_assigning_sends_the_tables_message() -> None:
    _, agent, job, outbox = await _job_on_an_agent(budget=1000)
    (message,) = outbox.sent
    assert isinstance(message, JobAssign) and message.job_id == job.job_id and agent.in_flight == 1


async def test_a_backlog_makes_the_agents_socket_wait_for_the_consumer() -> None:
    dispatcher, agent, job, _ = await _job_on_an_agent(budget=64 * 1024 * 1024)
    piece = b"x" * (256 * 1024)
    for seq in range(4):  # 1 MiB waiting: the high-water mark
        assert await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=seq, data=piece))
    blocked = asyncio.ensure_future(dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=4, data=piece)))
    # What must not happen has no event to wait for: give the reader time to run on, and check it did not.
    await asyncio.sleep(0.05)
    assert not blocked.done()  # the agent's reader waits: nothing more is read from its socket
    for _ in range(3):  # the consumer reads, not yet down to the low-water mark
        await job.next(1.0)
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await job.next(1.0)  # now it is: the agent's socket is read again
    await asyncio.wait_for(blocked, 1.0)
    assert job.queued == jobs.QUEUE_LOW and not job.finished


async def test_a_consumer_that_never_reads_has_its_own_job_cut_when_the_clock_says_so() -> None:
    clock = _Clock()
    dispatcher, agent, job, outbox = await _job_on_an_agent(budget=64 * 1024 * 1024, clock=clock)
    piece = b"x" * (512 * 1024)
    for seq in range(2):
        await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=seq, data=piece))
    blocked = asyncio.ensure_future(dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=2, data=piece)))
    await asyncio.sleep(0.05)
    assert not blocked.done() and not job.finished  # the drain timeout has not passed on the clock
    clock.now = dispatcher.drain_timeout
    await asyncio.wait_for(blocked, 1.0)
    assert job.finished and agent.in_flight == 0
    events = job.ready()
    assert isinstance(events[-1], Failure) and events[-1].code == errors.CONSUMER_TOO_SLOW
    await eventually_async(lambda: JobCancel(job_id=job.job_id) in outbox.sent)


async def test_an_overrun_sends_the_agent_a_cancel_and_frames_for_others_are_ignored() -> None:
    dispatcher, agent, job, outbox = await _job_on_an_agent(budget=1000)
    other = ConnectedAgent("agt_y", 2, 2, {"m": ModelOffer("m", "m", 1, 1)}, 4, _Outbox(), 0.0)
    assert not await dispatcher.on_chunk(other, JobChunk(job_id=job.job_id, seq=0, data=b"stolen"))
    assert job.queue.empty()
    assert await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=0, data=b"x" * 1001))
    (event,) = job.ready()
    assert isinstance(event, Failure) and event.code == errors.OUTPUT_OVERRUN
    await eventually_async(lambda: JobCancel(job_id=job.job_id) in outbox.sent)


async def test_a_cancelled_job_tells_a_connected_agent_only() -> None:
    dispatcher, agent, job, outbox = await _job_on_an_agent(budget=1000)
    job.cancel()
    await eventually_async(lambda: JobCancel(job_id=job.job_id) in outbox.sent)
    gone = await dispatcher.assign(agent, "m", b"{}", stream=True, want_usage=False)
    dispatcher.registry.remove(agent.agent_id)
    gone.cancel()
    await asyncio.sleep(0.05)  # nothing to wait for: a send to a removed agent must not happen
    assert JobCancel(job_id=gone.job_id) not in outbox.sent and gone.finished
