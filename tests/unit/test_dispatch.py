"""The job table (``coordinator.dispatch``) with a fake agent link: output budgets, back-pressure
from a slow consumer to the agent's socket, and frames that are not the agent's to send."""

from __future__ import annotations

import asyncio

import pytest

from coordinator import dispatch
from coordinator.dispatch import Dispatcher, Job, output_budget
from coordinator.registry import ConnectedAgent, Registry
from coordinator.upstream import Upstream
from shared import errors
from shared.backend import Failure
from shared.protocol import JobCancel, JobChunk, JobDone, ModelOffer


def test_output_budget_grows_with_the_bound_and_logprobs() -> None:
    assert output_budget(10, False) < output_budget(10, True) < output_budget(1000, True)
    assert output_budget(10, False) < 100_000


class _Outbox:
    """The agent's end of the socket, as the job table sees it: what was sent to it."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    async def send(self, message: object) -> None:
        self.sent.append(message)

    async def close(self, code: int, reason: str) -> None:
        self.sent.append(("close", code))


async def _job_on_an_agent(budget: int) -> tuple[Dispatcher, ConnectedAgent, Job, _Outbox]:
    registry = Registry()
    outbox = _Outbox()
    agent = ConnectedAgent("agt_x", 1, 1, {"m": ModelOffer("m", "m", 1, 1)}, 4, outbox, 0.0)
    registry.add(agent)
    dispatcher = Dispatcher(registry, Upstream(None, None, {}, 5.0), 5.0, 60.0)
    job = await dispatcher.assign(agent, "m", b"{}", stream=True, want_usage=False, budget=budget)
    return dispatcher, agent, job, outbox


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
    assert job.queued == dispatch.QUEUE_LOW


async def test_a_consumer_that_never_reads_has_its_own_job_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "DRAIN_TIMEOUT", 0.2)
    dispatcher, agent, job, outbox = await _job_on_an_agent(budget=64 * 1024 * 1024)
    piece = b"x" * (512 * 1024)
    for seq in range(3):
        await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=seq, data=piece))
    assert job.finished and agent.in_flight == 0
    events = job.ready()
    assert isinstance(events[-1], Failure) and events[-1].code == errors.CONSUMER_TOO_SLOW
    await asyncio.sleep(0)
    assert any(isinstance(m, JobCancel) for m in outbox.sent)


async def test_output_past_the_budget_ends_the_job_and_frames_for_others_are_ignored() -> None:
    dispatcher, agent, job, outbox = await _job_on_an_agent(budget=1000)
    other = ConnectedAgent("agt_y", 2, 2, {"m": ModelOffer("m", "m", 1, 1)}, 4, _Outbox(), 0.0)
    assert not await dispatcher.on_chunk(other, JobChunk(job_id=job.job_id, seq=0, data=b"stolen"))
    assert not dispatcher.on_done(other, JobDone(job_id=job.job_id))
    assert job.queue.empty()
    assert await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=0, data=b"x" * 1001))
    (event,) = job.ready()
    assert isinstance(event, Failure) and event.code == errors.OUTPUT_OVERRUN
    assert not await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=1, data=b"late"))
    await asyncio.sleep(0)
    assert any(isinstance(m, JobCancel) for m in outbox.sent)
