"""The request lifecycle without sockets: reading a job (:class:`JobReader`) and the one outcome a
request ends in (:func:`conclude`)."""

from __future__ import annotations

import contextlib

import msgspec
import pytest

from coordinator.money.metering import Meter, Price
from coordinator.services.inference import CONSUMER_GONE, Ending, conclude
from coordinator.serving.jobreader import OVERRUN_SLACK, JobReader
from coordinator.serving.jobs import Job
from coordinator.trust import audit
from coordinator.trust import scores as trust
from shared import errors
from shared.backend import Chunk, Done, Failure
from shared.protocol import Usage

PRICE = Price(10, 20)


def chunk(text: str) -> bytes:
    return msgspec.json.encode({"choices": [{"index": 0, "delta": {"content": text}}]})


def whole(text: str) -> bytes:
    return msgspec.json.encode({"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}]})


def job_with(*events: Chunk | Done | Failure) -> tuple[Job, Chunk | Done | Failure]:
    """A job whose events are already queued (no agent, no sockets); its first event."""
    job = Job("job_test", None, "smollm2-135m")
    for event in events[1:]:
        job.queue.put_nowait(event)
    return job, events[0]


async def read_all(reader: JobReader) -> list[list[bytes]]:
    batches = []
    async with contextlib.aclosing(reader.batches(idle=1.0)) as stream:
        async for batch in stream:
            batches.append(batch)
    return batches


async def test_a_stream_is_read_counted_and_ended() -> None:
    usage = Usage(3, 4, 7)
    job, first = job_with(*(Chunk(chunk(f"t{i} ")) for i in range(3)), Done(usage, "stop", [chunk("end")]))
    reader = JobReader(job, first, bound=10)
    batches = await read_all(reader)
    assert [len(b) for b in batches] == [4]  # everything queued arrives as one batch, the tail with it
    assert reader.end == Done(usage, "stop", [chunk("end")]) and reader.delivered == 4
    assert reader.output.text == "t0 t1 t2 end" and not reader.cut


async def test_a_batch_counts_as_delivered_only_once_the_next_is_asked_for() -> None:
    job, first = job_with(Chunk(chunk("a")))
    reader = JobReader(job, first, bound=10)
    stream = reader.batches(idle=0.05)
    assert await anext(stream) == [chunk("a")]
    assert reader.delivered == 0  # handed out, not yet taken
    job.queue.put_nowait(Chunk(chunk("b")))
    assert await anext(stream) == [chunk("b")]
    assert reader.delivered == 1
    await stream.aclose()
    assert reader.end is None and reader.delivered == 1  # the consumer left before taking "b"


async def test_output_past_the_bound_is_cut_not_relayed() -> None:
    bound = 3
    chunks = [Chunk(chunk(f"t{i}")) for i in range(bound + OVERRUN_SLACK + 5)]
    job, first = job_with(*chunks)
    reader = JobReader(job, first, bound=bound)
    batches = await read_all(reader)
    assert sum(len(b) for b in batches) == bound + OVERRUN_SLACK
    assert isinstance(reader.end, Failure) and reader.end.code == errors.OUTPUT_OVERRUN
    assert reader.delivered == bound + OVERRUN_SLACK


async def test_a_reader_that_read_enough_stops_early() -> None:
    job, first = job_with(*(Chunk(chunk(f"t{i}")) for i in range(10)))
    reader = JobReader(job, first, stop_after=4)
    batches = await read_all(reader)
    assert sum(len(b) for b in batches) == 4 and reader.cut and reader.end is None


async def test_a_whole_reply_is_joined_and_counted() -> None:
    usage = Usage(2, 2, 4)
    body = whole("hello there")
    job, first = job_with(Chunk(body[:10]), Done(usage, "stop", [body[10:]]))
    reader = JobReader(job, first)
    assert await reader.whole(silence=1.0) == body
    assert reader.delivered == 1 and reader.output.text == "hello there"
    failed, first = job_with(Failure(errors.BACKEND_ERROR, "boom", True))
    reader = JobReader(failed, first)
    assert await reader.whole(silence=1.0) == Failure(errors.BACKEND_ERROR, "boom", True)
    assert not reader.started


async def test_silence_ends_a_whole_reply_as_a_timeout() -> None:
    job, first = job_with(Chunk(b"{"))
    reader = JobReader(job, first)
    failure = await reader.whole(silence=0.01)
    assert isinstance(failure, Failure) and failure.code == errors.TIMED_OUT
    assert reader.started  # output had begun: a stall, not a failure to start


# --- the outcome --------------------------------------------------------------------------------


def audited(
    job: Job, output: audit.Output, usage: Usage | None, *, stream: bool = True, delivered: int = 0
) -> audit.Finished:
    return audit.Finished(
        stream=stream,
        delivered=delivered,
        reported=usage,
        output=output,
        seconds=10.0,
        parameter_count=135_000_000,
        prompt_bound=100,
        prompt_estimate=12,
    )


def served(texts: list[str]) -> tuple[Job, audit.Output]:
    job = Job("job_test", None, "smollm2-135m")
    job.first_at = 1.0
    output = audit.Output()
    for text in texts:
        output.read(chunk(text))
    return job, output


def meter(usage: Usage | None, delivered: int) -> Meter:
    m = Meter(100, 50, 12)
    m.usage, m.delivered = usage, delivered
    return m


def test_an_honest_completed_job_is_billed_as_reported_and_vouched_for() -> None:
    job, output = served(["a ", "b ", "c"])
    usage = Usage(20, 3, 23)
    ending = Ending(200, job=job, completed=True)
    outcome = conclude(
        ending, meter(usage, 3), stream=True, audited=audited(job, output, usage, delivered=3), price=PRICE, held=10_000
    )
    assert outcome.evidence == ((trust.COMPLETED, ""),) and outcome.billable
    assert outcome.bill is not None and (outcome.bill.prompt_tokens, outcome.bill.completion_tokens) == (20, 3)
    assert outcome.cost == 20 * 10 + 3 * 20 and not outcome.capped


def test_inflated_usage_is_evidence_and_billed_as_counted() -> None:
    job, output = served(["a ", "b "])
    usage = Usage(10**9, 10**9, 2 * 10**9)
    ending = Ending(200, job=job, completed=True)
    outcome = conclude(
        ending, meter(usage, 2), stream=True, audited=audited(job, output, usage, delivered=2), price=PRICE, held=10_000
    )
    assert [kind for kind, _ in outcome.evidence] == [trust.USAGE_INFLATED, trust.USAGE_INFLATED]
    assert outcome.bill is not None and outcome.bill.completion_tokens == 2  # counted, not claimed
    assert outcome.bill.prompt_tokens == 12  # the coordinator's estimate
    assert outcome.bill.reported == usage  # the claim stays on record
    assert outcome.cost == 12 * 10 + 2 * 20


@pytest.mark.parametrize(
    ("code", "started", "kind", "billable"),
    [
        (errors.TIMED_OUT, True, trust.STALLED, False),
        (errors.OUTPUT_OVERRUN, True, trust.OVERRAN, False),
        (errors.BACKEND_ERROR, True, trust.ABORTED, True),
        (errors.AGENT_BUSY, False, None, True),
        (errors.CONSUMER_TOO_SLOW, True, None, True),
    ],
)
def test_a_failed_job_is_evidence_unless_the_agent_was_not_at_fault(
    code: str, started: bool, kind: str | None, billable: bool
) -> None:
    job, output = served(["a ", "b "] if started else [])
    job.first_at = 1.0 if started else None
    failure = Failure(code, "it broke", True)
    ending = Ending(502, errors.PROVIDER_ERROR, job, failure=failure)
    outcome = conclude(
        ending,
        meter(None, 2 if started else 0),
        stream=True,
        audited=audited(job, output, None),
        price=PRICE,
        held=10_000,
    )
    assert [k for k, _ in outcome.evidence] == ([kind] if kind else [])
    assert outcome.billable is billable
    # A stream that broke bills what was delivered, and nothing when the agent broke it.
    assert outcome.cost == (2 * 20 if started and billable else 0)


def test_a_consumer_who_left_pays_for_the_prompt_and_what_it_took() -> None:
    job, output = served(["a ", "b ", "c "])
    ending = Ending(499, CONSUMER_GONE, job)
    outcome = conclude(
        ending, meter(None, 3), stream=True, audited=audited(job, output, None), price=PRICE, held=10_000
    )
    assert outcome.evidence == () and outcome.billable  # nothing to say about the agent
    assert outcome.bill is not None and (outcome.bill.prompt_tokens, outcome.bill.completion_tokens) == (12, 3)


def test_the_cost_never_exceeds_the_hold_and_the_upstream_cost_is_recorded() -> None:
    job = Job("job_up", None, "smollm2-135m")
    usage = Usage(20, 30, 50)
    ending = Ending(200, job=job, completed=True)
    outcome = conclude(
        ending, meter(usage, 30), stream=False, audited=None, price=PRICE, held=100, upstream_cost=Price(1, 2)
    )
    assert outcome.evidence == ()  # the upstream is not judged
    assert outcome.cost == 100 and outcome.capped
    assert outcome.upstream_cost == 20 * 1 + 30 * 2


def test_without_a_job_or_a_hold_nothing_is_billed() -> None:
    refused = conclude(
        Ending(404, errors.MODEL_NOT_FOUND), meter(None, 0), stream=False, audited=None, price=PRICE, held=None
    )
    assert refused.bill is None and refused.cost == 0 and refused.evidence == ()
