"""The job table (``coordinator.serving.jobs``) alone: frames and times in, messages and queued events out,
no sockets and no event loop."""

from __future__ import annotations

from coordinator.market.registry import ConnectedAgent
from coordinator.serving import jobs
from coordinator.serving.jobs import Job, JobTable, output_budget
from shared import errors
from shared.backend import Chunk, Done, Failure
from shared.protocol import JobAssign, JobCancel, JobChunk, JobDone, JobFailed, ModelOffer, Usage


class _NoLink:
    """The table never talks to an agent: any use of its link fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the job table used the agent's link ({name})")


def _agent(agent_id: str = "agt_x") -> ConnectedAgent:
    return ConnectedAgent(agent_id, 1, 1, {"m": ModelOffer("m", "backend-m", 1, 1)}, 4, _NoLink(), 0.0)


def _open(table: JobTable, agent: ConnectedAgent, budget: int = 10_000) -> tuple[Job, JobAssign]:
    return table.open(agent, "m", b"{}", stream=True, want_usage=True, budget=budget, now=1000.0, loop_now=50.0)


def test_output_budget_grows_with_the_bound_and_logprobs() -> None:
    assert output_budget(10, False) < output_budget(10, True) < output_budget(1000, True)
    assert output_budget(10, False) < 100_000


def test_opening_a_job_counts_it_against_the_agent_and_says_what_to_send() -> None:
    table, agent = JobTable(job_deadline=60.0), _agent()
    job, message = _open(table, agent)
    assert message == JobAssign(
        job_id=job.job_id,
        model="m",
        backend_model="backend-m",
        request=b"{}",
        stream=True,
        want_usage=True,
        deadline=1060.0,
    )
    assert agent.in_flight == 1 and agent.share.in_flight == 1 and agent.jobs == {job.job_id} and len(table) == 1
    other, _ = _open(table, agent)
    assert other.job_id != job.job_id and agent.in_flight == 2


def test_output_is_queued_and_the_end_frees_the_slot() -> None:
    table, agent = JobTable(60.0), _agent()
    job, _ = _open(table, agent)
    assert table.chunk(agent, JobChunk(job_id=job.job_id, seq=0, data=b"abc")) == jobs.TAKEN
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    assert table.done(agent, JobDone(job_id=job.job_id, usage=usage, finish_reason="stop", tail=[b"de"])).known
    assert job.ready() == [Chunk(b"abc"), Done(usage, "stop", [b"de"])]
    assert job.finished and job.received == 5 and agent.in_flight == 0 and not agent.jobs and len(table) == 0
    # Once over, the job is nobody's: later frames are skipped.
    assert not table.chunk(agent, JobChunk(job_id=job.job_id, seq=1, data=b"late")).known
    assert not table.failed(agent, JobFailed(job_id=job.job_id, code="x", message="y")).known
    assert job.ready() == []


def test_frames_for_another_agents_job_are_ignored() -> None:
    table, agent, thief = JobTable(60.0), _agent(), _agent("agt_y")
    job, _ = _open(table, agent)
    assert table.chunk(thief, JobChunk(job_id=job.job_id, seq=0, data=b"stolen")) == jobs.IGNORED
    assert table.done(thief, JobDone(job_id=job.job_id)) == jobs.IGNORED
    assert table.failed(thief, JobFailed(job_id=job.job_id, code="x", message="y")) == jobs.IGNORED
    assert table.progress(thief, job.job_id) == jobs.IGNORED
    assert job.ready() == [] and not job.finished and agent.in_flight == 1


def test_output_past_the_budget_cuts_the_job_and_stops_the_agent() -> None:
    table, agent = JobTable(60.0), _agent()
    job, _ = _open(table, agent, budget=1000)
    assert table.chunk(agent, JobChunk(job_id=job.job_id, seq=0, data=b"x" * 600)) == jobs.TAKEN
    reply = table.chunk(agent, JobChunk(job_id=job.job_id, seq=1, data=b"x" * 401))
    assert reply.known and reply.send == (JobCancel(job_id=job.job_id),)
    assert reply.cut is not None and reply.cut.code == errors.OUTPUT_OVERRUN
    chunk, failure = job.ready()
    assert chunk == Chunk(b"x" * 600) and failure == reply.cut and agent.in_flight == 0
    # A tail counts as output too.
    tailed, _ = _open(table, agent, budget=1000)
    reply = table.done(agent, JobDone(job_id=tailed.job_id, tail=[b"y" * 1001]))
    assert reply.cut is not None and reply.send == (JobCancel(job_id=tailed.job_id),)
    assert [type(event) for event in tailed.ready()] == [Failure]


def test_a_backlog_asks_the_agent_to_wait_until_it_is_read_down() -> None:
    table, agent = JobTable(60.0), _agent()
    job, _ = _open(table, agent, budget=64 * 1024 * 1024)
    piece = b"x" * (256 * 1024)
    replies = [table.chunk(agent, JobChunk(job_id=job.job_id, seq=seq, data=piece)) for seq in range(5)]
    assert [reply.backlog for reply in replies] == [None, None, None, None, job]  # past QUEUE_HIGH
    assert table.backlogged(job)
    events = job.ready()  # the consumer reads everything
    assert len(events) == 5 and job.queued == 0 and not table.backlogged(job)


def test_cut_and_cancel_stop_a_running_job_once() -> None:
    table, agent = JobTable(60.0), _agent()
    job, _ = _open(table, agent)
    failure = Failure(errors.CONSUMER_TOO_SLOW, "the consumer stopped reading", False)
    assert table.cut(job, failure) == (JobCancel(job_id=job.job_id),)
    assert job.ready() == [failure] and agent.in_flight == 0
    assert table.cut(job, failure) == () and table.cancel(job) == () and job.ready() == []
    cancelled, _ = _open(table, agent)
    assert table.cancel(cancelled) == (JobCancel(job_id=cancelled.job_id),)
    assert cancelled.finished and cancelled.ready() == [] and agent.in_flight == 0


def test_losing_an_agent_fails_its_jobs_only() -> None:
    table, agent, other = JobTable(60.0), _agent(), _agent("agt_y")
    mine = [_open(table, agent)[0] for _ in range(2)]
    theirs, _ = _open(table, other)
    table.lost(agent, "heartbeats missed")
    for job in mine:
        (event,) = job.ready()
        assert isinstance(event, Failure) and event.code == errors.AGENT_LOST and event.retryable
        assert "heartbeats missed" in event.message
    assert agent.in_flight == 0 and not agent.jobs
    assert theirs.ready() == [] and other.in_flight == 1 and len(table) == 1


def test_an_agents_failure_is_relayed_shortened() -> None:
    table, agent = JobTable(60.0), _agent()
    job, _ = _open(table, agent)
    message = JobFailed(job_id=job.job_id, code="c" * 100, message="m" * 10_000, retryable=True, status=503)
    assert table.failed(agent, message).known
    (event,) = job.ready()
    assert event == Failure("c" * 64, "m" * jobs.FAILURE_MESSAGE_CHARS, True, 503)


def test_an_adopted_job_counts_here_and_sends_its_events_to_the_replica_reading_it() -> None:
    """The job relay: another replica placed this job on our agent; its events go there, not to a queue."""
    table, agent = JobTable(60.0), _agent()
    sent: list[object] = []
    assign = JobAssign(
        job_id="job_remote", model="m", backend_model="?", request=b"{}", stream=True, want_usage=True, deadline=1.0
    )
    job = table.adopt(agent, assign, sent.append, budget=10, loop_now=50.0)
    assert job is not None and job.job_id == "job_remote" and agent.in_flight == 1 and table.get("job_remote") is job
    assert table.adopt(agent, assign, sent.append, budget=10, loop_now=50.0) is None  # one job per id
    assert table.chunk(agent, JobChunk(job_id="job_remote", seq=0, data=b"abcd")) == jobs.TAKEN
    assert table.progress(agent, "job_remote").known
    assert not table.chunk(_agent("agt_other"), JobChunk(job_id="job_remote", seq=1, data=b"x")).known
    reply = table.chunk(agent, JobChunk(job_id="job_remote", seq=2, data=b"0123456789"))  # past its budget
    assert reply.cut is not None and reply.send == (JobCancel(job_id="job_remote"),)
    assert sent[:2] == [Chunk(b"abcd"), None] and isinstance(sent[2], Failure)
    assert sent[2].code == errors.OUTPUT_OVERRUN and job.queue.empty() and agent.in_flight == 0
