"""``POST /v1/chat/completions``: OpenAI-compatible, streamed (SSE) or not.

The order of checks is the order of costs: key (guard), model, rate limits, capacity, then the hold
(402 before anything runs). Settling and logging happen after the answer, off the request's path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from coordinator import audit, trust
from coordinator.accounting import Charge, Reservation
from coordinator.accounts import Principal
from coordinator.billing import InsufficientCredits
from coordinator.dispatch import TIMED_OUT, Attempt, Job, Route, output_budget, provider_error
from coordinator.errors import error_body, error_response
from coordinator.forward import backend_body, content_problem
from coordinator.guards import require_consumer_key
from coordinator.metering import Meter, Price, output_bound, prompt_bound, prompt_estimate
from coordinator.present import present
from coordinator.placement import DEFAULT_ROUTING, Routing, offer_price
from coordinator.registry import ConnectedAgent
from coordinator.requestlog import RequestRecord
from coordinator.state import PoolState
from shared import errors
from shared.backend import Chunk, Done, Failure
from shared.money import NANO_PER_USD
from shared.openai import ChatCompletionRequest
from shared.protocol import Usage

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder()

CONSUMER_GONE = "consumer_gone"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class XPool(msgspec.Struct, omit_defaults=True):
    request_id: str
    provider: int | str
    agent: str | None
    fallback: bool
    latency_ms: int
    cost_usd: float
    ttft_ms: int | None = None
    model: str | None = None
    route: str | None = None  # why this agent: power_of_two, sort:price, order, fallback …
    candidates: int | None = None  # agents that could have taken the request
    attempts: int | None = None  # agents (and upstream) tried, failovers included


# Text deltas past the request's bound a stream may carry before it is cut as an overrun: room for
# a backend that splits a token's text in two, never enough to matter (billing stops at the bound).
OVERRUN_SLACK = 4


def usd(nano: int) -> str:
    return f"${nano / NANO_PER_USD:.6f}"


@dataclass(eq=False)
class Call:
    """One chat request in flight: what it may cost, what it did, and how it ended (once)."""

    pool: PoolState
    record: RequestRecord
    started: float
    meter: Meter
    token_estimate: int = 0
    reservation: Reservation | None = None
    route: Route | None = None
    output: audit.Output = field(default_factory=audit.Output)  # what was relayed, counted as it went
    reported: Usage | None = None  # the agent's usage report, when the audit overrode it
    ended: bool = False

    def show(self, payload: bytes, x_pool: XPool | None = None) -> bytes:
        """The payload as the consumer sees it (:mod:`coordinator.present`); the first thing the
        backend said of itself goes to the request log."""
        record = self.record
        shown, said = present(payload, record.id, record.model, x_pool)
        if record.backend_model is None and said.model is not None:
            record.backend_model = said.model
        if record.backend_id is None and said.id is not None:
            record.backend_id = said.id
        return shown

    def end(
        self,
        status: int,
        *,
        job: Job | None = None,
        completed: bool = False,
        failure: Failure | None = None,
        code: str | None = None,
        first_at: float | None = None,
    ) -> XPool | None:
        """Record the outcome, judge the agent's work, bill what ``job`` delivered (release the hold
        without a job) and log, in the background. Only the first call counts."""
        if self.ended:
            return None
        self.ended = True
        pool, record = self.pool, self.record
        record.status, record.error_code = status, code
        record.latency_ms = round((time.perf_counter() - self.started) * 1000)
        record.ttft_ms = None if first_at is None else round((first_at - self.started) * 1000)
        billable = True
        if job is not None and job.agent is not None:
            billable = self._judge(job, job.agent, completed, failure)
        charge: Charge | None = None
        if job is not None and self.reservation is not None:
            charge = self._bill(job, completed, billable, consumer_left=code == CONSUMER_GONE)
        if job is not None and completed and billable:
            pool.dispatcher.observe(job, record.completion_tokens, stream=record.stream)
        if job is not None or status in (502, 503):
            pool.stats.record(record.model, record.latency_ms, fallback=record.fallback, ok=status == 200)
            pool.history.record(record.model, record.latency_ms, fallback=record.fallback, ok=status == 200)
        pool.accounting.finish(record, charge, self.reservation, self.token_estimate)
        if job is not None and job.agent is not None:
            pool.clawback.served(job.agent.token_id, job.agent.agent_id, job.slug, record)  # until vouched for
        route = self.route
        return XPool(
            request_id=record.id,
            provider=record.provider_user_id if record.provider_user_id is not None else "platform",
            agent=record.agent_id,
            fallback=record.fallback,
            latency_ms=record.latency_ms,
            cost_usd=record.cost / NANO_PER_USD,
            ttft_ms=record.ttft_ms,
            model=record.model,
            route=route.reason if route else None,
            candidates=route.candidates if route else None,
            attempts=route.attempts if route else None,
        )

    def _judge(self, job: Job, agent: ConnectedAgent, completed: bool, failure: Failure | None) -> bool:
        """Evidence about the agent from how its job ended; whether the consumer pays for it. A job
        that went silent, overran its bound or produced garbage is not billed; inflated usage is
        billed as counted."""
        dispatcher = self.pool.dispatcher
        if failure is not None:
            started = job.first_at is not None
            at_fault = dispatcher.witness_failure(agent, job, failure, started=started)
            # A stall, or output past what the request allowed, is not billed: the agent broke the job.
            return not (at_fault and failure.code in (TIMED_OUT, errors.OUTPUT_OVERRUN))
        if not completed:
            return True  # the consumer went away: nothing to say about the agent
        info = self.pool.directory.get(job.slug)
        meter = self.meter
        verdict = audit.judge(
            audit.Job(
                stream=self.record.stream,
                delivered=meter.delivered,
                reported=meter.usage,
                output=self.output,
                seconds=time.perf_counter() - job.assigned_at,
                parameter_count=info.parameter_count if info is not None else None,
                prompt_bound=meter.prompt_bound,
                prompt_estimate=meter.prompt_estimate,
            )
        )
        # A consumer's prompt can ask for a repeated word or stop at once: output that fails the
        # sanity checks is not billed, but only verification jobs (our own prompts) count it against
        # the agent, so nobody can bench an agent by asking for garbage.
        findings = [(kind, detail) for kind, detail in verdict.findings if kind != trust.BAD_OUTPUT]
        for kind, detail in findings:
            dispatcher.witness(agent, kind, detail, job.job_id)
        if not findings:
            dispatcher.witness(agent, trust.COMPLETED, job_id=job.job_id)
        usage = meter.usage
        if usage is not None:
            # Billed: what the coordinator counted, never more than the agent claims.
            counted = max(meter.delivered, self.output.token_bound)
            completion = max(0, min(usage.completion_tokens, counted))
            prompt = usage.prompt_tokens if verdict.prompt_tokens is None else verdict.prompt_tokens
            if (prompt, completion) != (usage.prompt_tokens, usage.completion_tokens):
                self.reported = usage  # what the agent claimed, for the request log
                meter.usage = msgspec.structs.replace(usage, prompt_tokens=prompt, completion_tokens=completion)
        return verdict.billable

    def attribute(self, job: Job) -> None:
        """Log who served (or last tried) the request: an agent, or the upstream as the fallback."""
        record, agent = self.record, job.agent
        record.fallback = job.fallback
        record.agent_id = agent.agent_id if agent is not None else None
        record.provider_user_id = agent.user_id if agent is not None else None

    def _bill(self, job: Job, completed: bool, billable: bool, *, consumer_left: bool) -> Charge:
        record, agent = self.record, job.agent
        self.attribute(job)
        bill = self.meter.bill(completed=completed, stream=record.stream, consumer_left=consumer_left)
        record.prompt_tokens, record.completion_tokens = bill.prompt_tokens, bill.completion_tokens
        reported = self.reported or bill.reported
        if reported is not None:
            record.reported_prompt_tokens = reported.prompt_tokens
            record.reported_completion_tokens = reported.completion_tokens
        price = offer_price(agent, record.model) if agent is not None else self.pool.upstream.price
        amount = bill.amount(price) if billable else 0
        held = self.reservation.amount if self.reservation is not None else 0
        record.usage_capped = bill.capped or amount > held
        record.cost = min(amount, held)
        cost = 0
        if agent is None:
            used = bill.reported or bill
            cost = self.pool.upstream.cost.cost(used.prompt_tokens, used.completion_tokens)
        return Charge(record.cost, record.provider_user_id, cost)

    def reject(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response[bytes]:
        self.end(status, code=code)
        return error_response(status, code, message, param, headers)

    def no_capacity(self, models: list[str], routing: Routing, headers: dict[str, str]) -> Response[bytes]:
        retry_after = self.pool.settings.no_capacity_retry_after
        names = ", ".join(f"`{slug}`" for slug in models)
        matching = " matching the request's `provider` preferences" if routing != DEFAULT_ROUTING else ""
        return self.reject(
            503,
            errors.NO_CAPACITY,
            f"No provider{matching} has capacity for {names} right now. Retry in {retry_after} s.",
            headers={**headers, "retry-after": str(retry_after)},
        )

    def failed(self, failure: Failure, headers: dict[str, str], job: Job | None = None) -> Response[bytes]:
        """The request failed before any output reached the consumer: nothing is charged."""
        status, code, message = provider_error(failure)
        self.end(status, job=job, failure=failure, code=code)
        return error_response(status, code, message, None, headers)

    def abandon(self, job: Job) -> None:
        """After a stream response: if the relay never ran to its end, stop the job and bill what went out."""
        if not self.ended:
            job.cancel()
            self.end(499, job=job, code=CONSUMER_GONE)


def _known_model(pool: PoolState, slug: str) -> bool:
    return pool.directory.get(slug) is not None or pool.upstream.serves(slug) or bool(pool.registry.serving(slug))


def _model_cap(pool: PoolState, slugs: list[str]) -> int:
    """The most tokens a completion of any of ``slugs`` can have: the directory's context window
    (the operator's word), else the default cap. What an agent announces binds its own jobs only:
    it never lowers what every other agent's jobs may bill."""
    caps = []
    for slug in slugs:
        known = pool.directory.get(slug)
        caps.append(known.context_window if known is not None and known.context_window else None)
    return max(cap or pool.settings.default_output_tokens for cap in caps)


@post(
    "/v1/chat/completions",
    before_request=require_consumer_key,  # runs before the body is parsed, as a guard would
    summary="Create a chat completion",
    description=(
        "OpenAI-compatible chat completions, served by a provider agent or the platform upstream. The worst-case "
        "cost is held from the caller's credits before dispatch (402 `insufficient_credits` if short) and the "
        "actual usage is charged when the request ends."
    ),
    tags=["inference"],
    status_code=200,
)
async def create_chat_completion(request: Request[Any, Any, Any], data: ChatCompletionRequest) -> Response[Any]:
    pool: PoolState = request.app.state.pool
    principal: Principal = request.state.principal
    record: RequestRecord = request.state.record
    models = data.models
    record.model, record.stream = models[0], data.stream
    raw = await request.body()
    bound = output_bound(data, _model_cap(pool, models))
    call = Call(pool, record, time.perf_counter(), Meter(prompt_bound(raw), bound, prompt_estimate(data)))
    for slug in models:
        if not _known_model(pool, slug):
            return call.reject(
                404,
                errors.MODEL_NOT_FOUND,
                f"The model `{slug}` does not exist in this pool. GET /v1/models lists the available models.",
                param="model",
            )
    problem = content_problem(data)
    if problem is not None:
        return call.reject(400, errors.INVALID_REQUEST, problem[1], param=problem[0])
    body = backend_body(raw, bound)
    estimate = len(raw) // 4 + (data.max_completion_tokens or data.max_tokens or 0)
    decision = pool.key_limits.admit(principal.credential_id, estimate, principal.rpm, principal.tpm)
    if not decision.allowed:
        return call.reject(
            429,
            errors.RATE_LIMIT_EXCEEDED,
            f"Rate limit reached for this key. Retry in {decision.retry_after} s.",
            headers=decision.headers,
        )
    call.token_estimate = estimate
    pool.verifier.observe(raw)  # canaries copy the shapes of admitted requests
    limits = decision.headers
    routing = Routing.of(data.provider)
    prices = pool.dispatcher.prices(models, routing)
    if not prices:
        return call.no_capacity(models, routing, limits)
    try:
        return await _run(call, data, body, routing, prices, limits)
    except BaseException:
        call.end(500, code=errors.INTERNAL_ERROR)
        raise


async def _hold(call: Call, prices: list[Price]) -> Price:
    """Reserve the worst case at the highest prices on offer, or, if the consumer's credit cannot
    cover that, at the cheapest offer's (the request then goes only to offers that cheap): one
    dear agent cannot price a consumer out of the cheap ones. Returns the prices the hold covers;
    :class:`InsufficientCredits` if even the cheapest is out of reach."""
    meter, accounting = call.meter, call.pool.accounting
    ceiling = Price(max(p.input for p in prices), max(p.output for p in prices))
    try:
        call.reservation = await accounting.reserve(call.record, meter.hold_amount(ceiling))
        return ceiling
    except InsufficientCredits:
        cheapest = min(prices, key=meter.hold_amount)
        if meter.hold_amount(cheapest) >= meter.hold_amount(ceiling):
            raise
    call.reservation = await accounting.reserve(call.record, meter.hold_amount(cheapest))
    return cheapest


async def _run(
    call: Call, data: ChatCompletionRequest, body: bytes, routing: Routing, prices: list[Price], limits: dict[str, str]
) -> Response[Any]:
    pool = call.pool
    try:
        ceiling = await _hold(call, prices)
    except InsufficientCredits as exc:
        return call.reject(
            402,
            errors.INSUFFICIENT_CREDITS,
            f"Insufficient credits: this request may cost up to {usd(exc.needed)} (prompt and max_tokens at the "
            f"lowest price on offer) and {usd(exc.available)} is available. Add credits or lower max_tokens.",
            headers=limits,
        )
    stream = data.stream
    want_usage = bool(stream and data.stream_options and data.stream_options.include_usage)
    attempt = await pool.dispatcher.start(
        data.models,
        body,
        stream=stream,
        want_usage=want_usage,
        routing=routing,
        max_price=ceiling,
        budget=output_budget(call.meter.completion_bound, bool(data.logprobs)),
    )
    if attempt is None:
        return call.no_capacity(data.models, routing, limits)
    call.route = attempt.route
    call.record.model = attempt.route.model
    if isinstance(attempt.first, Failure):
        attempt.job.cancel()
        call.attribute(attempt.job)
        return call.failed(attempt.first, limits)
    if stream:
        return Stream(
            _relay(call, attempt),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **limits},
            background=BackgroundTask(call.abandon, attempt.job),
        )
    return await _complete(call, attempt, limits)


async def _complete(call: Call, attempt: Attempt, limits: dict[str, str]) -> Response[Any]:
    """Non-stream: nothing reaches the consumer before the end. The agent says it is alive while
    its backend works; silence for ``POOL_WHOLE_REPLY_SILENCE`` ends the job as a failure."""
    job, event = attempt.job, attempt.first
    silence = call.pool.dispatcher.silence(stream=False)
    parts: list[bytes] = []
    while True:
        if isinstance(event, Chunk):
            parts.append(event.data)
        elif isinstance(event, Done):
            body = b"".join([*parts, *event.tail])  # an agent may send a reply whole with its end
            call.meter.usage = event.usage
            call.meter.delivered = call.output.read(body)
            x_pool = call.end(200, job=job, completed=True)
            assert x_pool is not None
            return Response(call.show(body, x_pool), media_type="application/json", headers=limits)
        else:
            job.cancel()
            return call.failed(event, limits, job)
        event = await job.next(silence)


def _overran(call: Call, job: Job) -> Failure:
    job.cancel()
    bound = call.meter.completion_bound
    return Failure(errors.OUTPUT_OVERRUN, f"the provider sent more than the request's {bound} tokens", False)


async def _relay(call: Call, attempt: Attempt) -> AsyncIterator[bytes]:
    """Relay a started job as SSE, counting its output as it goes; an error after the first chunk,
    or output past the request's bound, ends the stream with an error event."""
    job, event = attempt.job, attempt.first
    first_at = time.perf_counter()
    idle = call.pool.settings.idle_timeout
    meter, output = call.meter, call.output
    most = meter.completion_bound + OVERRUN_SLACK
    try:
        while True:
            out: list[bytes] = []
            carried = 0  # counted as delivered once the consumer's connection took them
            end: Done | Failure | None = None
            for item in (event, *job.ready()):
                if isinstance(item, Chunk):
                    tokens = output.read(item.data)
                    if meter.delivered + carried + tokens > most:  # not relayed: the job is cut here
                        end = _overran(call, job)
                        break
                    carried += tokens
                    out.append(b"data: " + call.show(item.data) + b"\n\n")
                    continue
                end = item
                break
            if end is None:
                yield b"".join(out)
                meter.delivered += carried
                event = await job.next(idle)
                continue
            if isinstance(end, Done):
                tokens = sum(output.read(chunk) for chunk in end.tail)
                if meter.delivered + carried + tokens > most:
                    end = _overran(call, job)
                else:
                    carried += tokens
            meter.delivered += carried
            if isinstance(end, Done):
                meter.usage = end.usage
                x_pool = call.end(200, job=job, completed=True, first_at=first_at)
                tail = list(end.tail)
                out.extend(
                    b"data: " + call.show(chunk, x_pool if i == len(tail) - 1 else None) + b"\n\n"
                    for i, chunk in enumerate(tail)
                )
                out.append(b"data: [DONE]\n\n")
            else:
                log.warning("stream failed after first chunk", extra={"job_id": job.job_id, "code": end.code})
                status, code, message = provider_error(end)
                call.end(status, job=job, failure=end, code=code, first_at=first_at)
                out.append(b"data: " + _json.encode(error_body(status, code, message)) + b"\n\n")
            yield b"".join(out)
            return
    finally:
        if not job.finished:
            log.info("consumer went away, cancelling job", extra={"job_id": job.job_id})
            job.cancel()
        call.end(499, job=job, code=CONSUMER_GONE, first_at=first_at)
