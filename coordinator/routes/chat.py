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
from coordinator.dispatch import TIMED_OUT, Attempt, Job, Route, provider_error
from coordinator.errors import error_body, error_response
from coordinator.guards import require_consumer_key
from coordinator.metering import Meter, Price, output_bound, prompt_bound, text_deltas
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


_strip_decoder = msgspec.json.Decoder(dict[str, Any])


def without_preferences(raw: bytes) -> bytes:
    """The body without the pool's own ``provider`` object: backends (and the agents that run them)
    see only what OpenAI's API defines."""
    body = _strip_decoder.decode(raw)
    body.pop("provider", None)
    return _json.encode(body)


def stamp(payload: bytes, x_pool: XPool) -> bytes:
    """Add ``"x_pool": {…}`` to a JSON object without re-parsing it."""
    body = payload.rstrip()
    if not body.endswith(b"}"):
        return payload
    inner = body[:-1].rstrip()
    separator = b"" if inner.endswith(b"{") else b","
    return inner + separator + b'"x_pool":' + _json.encode(x_pool) + b"}"


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
    output: list[bytes] = field(default_factory=list)  # payloads relayed, for the audit
    reported: Usage | None = None  # the agent's usage report, when the audit overrode it
    ended: bool = False

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
            charge = self._bill(job, completed, billable)
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
        that went silent or produced garbage is not billed; inflated usage is billed as counted."""
        dispatcher = self.pool.dispatcher
        if failure is not None:
            started = job.first_at is not None
            return not (dispatcher.witness_failure(agent, job, failure, started=started) and failure.code == TIMED_OUT)
        if not completed:
            return True  # the consumer went away: nothing to say about the agent
        info = self.pool.directory.get(job.slug)
        verdict = audit.judge(
            audit.Job(
                stream=self.record.stream,
                delivered=self.meter.delivered,
                reported=self.meter.usage,
                output=audit.read_output(self.output),
                seconds=time.perf_counter() - job.assigned_at,
                parameter_count=info.parameter_count if info is not None else None,
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
        usage = self.meter.usage
        if verdict.completion_tokens is not None and usage is not None:
            self.reported = usage  # what the agent claimed, for the request log
            self.meter.usage = msgspec.structs.replace(usage, completion_tokens=verdict.completion_tokens)
        return verdict.billable

    def _bill(self, job: Job, completed: bool, billable: bool) -> Charge:
        record, agent = self.record, job.agent
        record.fallback = job.fallback
        record.agent_id = agent.agent_id if agent is not None else None
        record.provider_user_id = agent.user_id if agent is not None else None
        bill = self.meter.bill(completed=completed, stream=record.stream)
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
            self.end(499, job=job, code="consumer_gone")


def _known_model(pool: PoolState, slug: str) -> bool:
    return pool.directory.get(slug) is not None or pool.upstream.serves(slug) or bool(pool.registry.serving(slug))


def _model_cap(pool: PoolState, slugs: list[str]) -> int:
    """The most tokens a completion of any of ``slugs`` can have: their context windows where known."""
    caps = []
    for slug in slugs:
        windows = [w for a in pool.registry.serving(slug) if (w := a.models[slug].context_window)]
        known = pool.directory.get(slug)
        if known is not None and known.context_window:
            windows.append(known.context_window)
        caps.append(min(windows) if windows else pool.settings.default_output_tokens)
    return max(caps)


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
    if data.provider is not None:
        raw = without_preferences(raw)
    call = Call(
        pool, record, time.perf_counter(), Meter(prompt_bound(raw), output_bound(data, _model_cap(pool, models)))
    )
    for slug in models:
        if not _known_model(pool, slug):
            return call.reject(
                404,
                errors.MODEL_NOT_FOUND,
                f"The model `{slug}` does not exist in this pool. GET /v1/models lists the available models.",
                param="model",
            )
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
    ceiling = pool.dispatcher.ceiling(models, routing)
    if ceiling is None:
        return call.no_capacity(models, routing, limits)
    try:
        return await _run(call, data, raw, routing, ceiling, limits)
    except BaseException:
        call.end(500, code=errors.INTERNAL_ERROR)
        raise


async def _run(
    call: Call, data: ChatCompletionRequest, raw: bytes, routing: Routing, ceiling: Price, limits: dict[str, str]
) -> Response[Any]:
    pool = call.pool
    amount = call.meter.hold_amount(ceiling)
    try:
        call.reservation = await pool.accounting.reserve(call.record, amount)
    except InsufficientCredits as exc:
        return call.reject(
            402,
            errors.INSUFFICIENT_CREDITS,
            f"Insufficient credits: this request may cost up to {usd(exc.needed)} (prompt and max_tokens at the "
            f"highest price on offer) and {usd(exc.available)} is available. Add credits or lower max_tokens.",
            headers=limits,
        )
    stream = data.stream
    want_usage = bool(stream and data.stream_options and data.stream_options.include_usage)
    attempt = await pool.dispatcher.start(
        data.models, raw, stream=stream, want_usage=want_usage, routing=routing, max_price=ceiling
    )
    if attempt is None:
        return call.no_capacity(data.models, routing, limits)
    call.route = attempt.route
    call.record.model = attempt.route.model
    if isinstance(attempt.first, Failure):
        attempt.job.cancel()
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
    """Non-stream: nothing reaches the consumer before the end, so any retryable failure fails over."""
    job, event = attempt.job, attempt.first
    parts: list[bytes] = []
    while True:
        if isinstance(event, Chunk):
            parts.append(event.data)
        elif isinstance(event, Done):
            body = b"".join([*parts, *event.tail])  # an agent may send a reply whole with its end
            call.meter.usage = event.usage
            call.output.append(body)
            x_pool = call.end(200, job=job, completed=True)
            assert x_pool is not None
            return Response(stamp(body, x_pool), media_type="application/json", headers=limits)
        else:
            job.cancel()
            return call.failed(event, limits, job)
        event = await job.next(call.pool.settings.idle_timeout)


async def _relay(call: Call, attempt: Attempt) -> AsyncIterator[bytes]:
    """Relay a started job as SSE; an error after the first chunk ends the stream with an error event."""
    job, event = attempt.job, attempt.first
    first_at = time.perf_counter()
    idle = call.pool.settings.idle_timeout
    meter, output = call.meter, call.output
    try:
        while True:
            out: list[bytes] = []
            deltas = 0  # counted as delivered once the consumer's connection took them
            for item in (event, *job.ready()):
                if isinstance(item, Chunk):
                    deltas += text_deltas(item.data)
                    output.append(item.data)
                    out.append(b"data: " + item.data + b"\n\n")
                    continue
                meter.delivered += deltas
                if isinstance(item, Done):
                    meter.delivered += sum(text_deltas(chunk) for chunk in item.tail)
                    meter.usage = item.usage
                    output.extend(item.tail)
                    x_pool = call.end(200, job=job, completed=True, first_at=first_at)
                    tail = list(item.tail)
                    if tail and x_pool is not None:
                        tail[-1] = stamp(tail[-1], x_pool)
                    out.extend(b"data: " + chunk + b"\n\n" for chunk in tail)
                    out.append(b"data: [DONE]\n\n")
                else:
                    log.warning("stream failed after first chunk", extra={"job_id": job.job_id, "code": item.code})
                    status, code, message = provider_error(item)
                    call.end(status, job=job, failure=item, code=code, first_at=first_at)
                    out.append(b"data: " + _json.encode(error_body(status, code, message)) + b"\n\n")
                yield b"".join(out)
                return
            yield b"".join(out)
            meter.delivered += deltas
            event = await job.next(idle)
    finally:
        if not job.finished:
            log.info("consumer went away, cancelling job", extra={"job_id": job.job_id})
            job.cancel()
        call.end(499, job=job, code="consumer_gone", first_at=first_at)
