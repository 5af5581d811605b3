"""Reading one started job to its end, counting its output as it goes: the same for a consumer's
request (:mod:`coordinator.services.inference`) and a verification job (:mod:`coordinator.serving.verify`)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from coordinator.money.metering import Meter
from coordinator.serving.jobs import Job
from coordinator.trust import audit
from shared import errors
from shared.backend import Chunk, Done, Failure

# Text deltas past the request's bound a stream may carry before it is cut as an overrun: room for
# a backend that splits a token's text in two, never enough to matter (billing stops at the bound).
OVERRUN_SLACK = 4


def overran(job: Job, bound: int) -> Failure:
    """Cut ``job``: it sent more than the request's bound."""
    job.cancel()
    return Failure(errors.OUTPUT_OVERRUN, f"the provider sent more than the request's {bound} tokens", False)


@dataclass(eq=False)
class JobReader:
    """Reads one started job to its end, counting its output as it goes (:class:`audit.Output`):
    the same for a consumer's request and a verification job. A stream that overruns ``bound`` is
    cut; ``end`` is how the job ended, once it has."""

    job: Job
    first: Chunk | Done | Failure
    output: audit.Output = field(default_factory=audit.Output)
    bound: int | None = None  # the request's completion bound, for the overrun cut (streams)
    stop_after: int | None = None  # text deltas after which the reader has read enough (canaries)
    delivered: int = 0  # text deltas taken by the reader's consumer
    end: Done | Failure | None = None  # None after the end: the reader stopped early (``cut``)
    cut: bool = False
    started: bool = False  # output arrived: a failure now is a stall or an abort, not a failure to start

    def audited(self, stream: bool, parameter_count: int | None, meter: Meter | None = None) -> audit.Finished:
        """What the audit sees of the job once it ended (``meter``: the request's bounds)."""
        return audit.Finished(
            stream=stream,
            delivered=self.delivered,
            reported=self.end.usage if isinstance(self.end, Done) else None,
            output=self.output,
            seconds=time.perf_counter() - self.job.assigned_at,
            parameter_count=parameter_count,
            prompt_bound=meter.prompt_bound if meter is not None else None,
            prompt_estimate=meter.prompt_estimate if meter is not None else 0,
        )

    async def whole(self, silence: float) -> bytes | Failure:
        """A non-stream reply, read once complete, counted; or how the job failed (cancelled)."""
        job, event, parts = self.job, self.first, []
        while True:
            if isinstance(event, Chunk):
                self.started = True
                parts.append(event.data)
            elif isinstance(event, Done):
                body = b"".join([*parts, *event.tail])  # an agent may send a reply whole with its end
                self.delivered = self.output.read(body)
                self.end = event
                return body
            else:
                job.cancel()
                self.end = event
                return event
            event = await job.next(silence)

    async def batches(self, idle: float) -> AsyncGenerator[list[bytes], None]:
        """A stream's payloads in batches (what arrived while the last batch went out). A payload
        counts as delivered once the caller asks for the next batch; the last batch (``end`` is
        set) counts at once, so the outcome can bill it. Output past ``bound`` is not relayed: the
        job is cut and ``end`` says so."""
        job, event, output = self.job, self.first, self.output
        output.stream = True
        most = None if self.bound is None else self.bound + OVERRUN_SLACK
        while True:
            out: list[bytes] = []
            carried = 0
            for item in (event, *job.ready()):
                if isinstance(item, Chunk):
                    self.started = True
                    tokens = output.read(item.data)
                    if most is not None and self.delivered + carried + tokens > most:
                        self.end = overran(job, self.bound or 0)
                        break
                    carried += tokens
                    out.append(item.data)
                    if self.stop_after is not None and output.deltas >= self.stop_after:
                        job.cancel()  # as a consumer who read enough
                        self.cut = True
                        break
                    continue
                self.end = item
                break
            if self.cut:
                self.delivered += carried
                yield out
                return
            if isinstance(self.end, Done):
                tokens = sum(output.read(chunk) for chunk in self.end.tail)
                if most is not None and self.delivered + carried + tokens > most:
                    self.end = overran(job, self.bound or 0)
                else:
                    carried += tokens
                    out.extend(self.end.tail)
            if self.end is not None:
                self.delivered += carried
                yield out
                return
            yield out
            self.delivered += carried
            event = await job.next(idle)
