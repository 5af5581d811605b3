"""One consumer request from admission to its one outcome (DESIGN §3).

:func:`admit` checks what costs nothing (the model, the content, the key's rate limits, whether
anyone can serve), :meth:`Call.start` holds the worst case from the consumer's credit lease (402
before anything runs) and dispatches; :meth:`Call.whole` and :meth:`Call.relay` read the job,
counting its output as it goes (:class:`JobReader`, which verification jobs read with too), and
the request ends in one :class:`Outcome`. :meth:`Call.end` hands that outcome to each of its
consumers once: the audit (trust evidence), billing, performance, stats and history, the lease and
the request log, clawback. The route keeps HTTP: decoding, SSE framing, error responses.

Exceptions: :class:`Refusal` — the request is refused with an HTTP status, before or instead of
any output (its outcome is already recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import msgspec

from coordinator.core.errors import PoolError
from coordinator.identity import policies
from coordinator.identity.policies import KeyPolicy
from coordinator.identity.users import Principal
from coordinator.market import auto, placement, registry
from coordinator.market.auto import AUTO, AutoChoice, NothingFits
from coordinator.market.forward import backend_body, content_problem, kind_of, protect
from coordinator.market.placement import DEFAULT_ROUTING, Offers, Routing, offer_price
from coordinator.market.present import present
from coordinator.money.budgets import DAY, BudgetHold, CapReached
from coordinator.money.leases import Charge, Reservation
from coordinator.money.ledger import InsufficientCredits
from coordinator.money.metering import Bill, Meter, Price, output_bound, prompt_bound, prompt_estimate
from coordinator.money.requestlog import RequestRecord
from coordinator.services.state import PoolState
from coordinator.serving.dispatch import Attempt, Route
from coordinator.serving.jobreader import JobReader
from coordinator.serving.jobs import Job, output_budget
from coordinator.trust import audit
from coordinator.trust import scores as trust
from shared import errors
from shared.backend import Done, Failure
from shared.money import format_usd, nano_per_token_to_usd_per_million, nano_to_usd
from shared.openai import ChatCompletionRequest, ConsumerRequest, has_token_ids
from shared.protocol import CHAT, EMBEDDING

log = logging.getLogger(__name__)

CONSUMER_GONE = "consumer_gone"
DLP_INLINE_BYTES = 64 * 1024  # bodies up to this size are scanned on the event loop (a few ms at most)


class Refusal(PoolError):
    """The request is answered with an error instead of output; its outcome is already recorded."""


class PricePerMillion(msgspec.Struct):
    input: float
    output: float


def routed_by(routing: Routing) -> str:
    """What the request's routing optimised: its ``order``, its ``sort``, or the balance of price,
    speed, trust and load that placement weighs by default."""
    if routing.order:
        return "order"
    return routing.sort or "balanced"


class XPool(msgspec.Struct, omit_defaults=True):
    """What the pool adds to a reply (``x_pool``): who served it, how, and what it cost."""

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
    tier: str | None = None  # the key's privacy tier, when its policy sets one: any, trusted, platform
    auto: AutoChoice | None = None  # ``model: "auto"``: which model the pool chose, why, among which
    replica: str | None = None  # with replicas: the coordinator that served the consumer
    agent_replica: str | None = None  # … and the one the agent is connected to
    provider_slug: str | None = None  # the provider's public slug (``platform`` for the upstream)
    provider_name: str | None = None
    price_per_1m: PricePerMillion | None = None  # what the request was charged at, USD per 1M tokens
    routed_by: str | None = None  # what routing optimised: price, latency, throughput, balanced or order


@dataclass(frozen=True)
class Ending:
    """How a request ended, as its runner saw it: served (``completed``), failed (``failure``, or a
    refusal's ``code``), or cancelled (the consumer left: ``code`` is ``CONSUMER_GONE``)."""

    status: int
    code: str | None = None
    job: Job | None = None  # the job that served it, or failed last
    completed: bool = False
    failure: Failure | None = None
    first_at: float | None = None  # when the first output reached the consumer (streams)

    @property
    def consumer_left(self) -> bool:
        return self.code == CONSUMER_GONE


@dataclass(frozen=True)
class Outcome:
    """The one value a request ends in: its :class:`Ending`, the evidence about the agent that
    served it, and what it costs. :func:`conclude` makes it without side effects; each of its
    consumers (trust, billing, performance, stats, history, lease and log, clawback) reads it once."""

    ending: Ending
    evidence: tuple[tuple[str, str], ...] = ()  # (trust evidence kind, detail) about the job's agent
    billable: bool = True  # the agent's work is paid for (not garbage, a stall or an overrun)
    bill: Bill | None = None  # the tokens billed, when a job ran and a hold covers it
    cost: int = 0  # what the consumer pays, at most the hold
    capped: bool = False  # the bill was cut to the request's bounds or the hold
    upstream_cost: int = 0  # what the platform upstream charges the platform for it


def conclude(
    ending: Ending,
    meter: Meter,
    *,
    stream: bool,
    audited: audit.Finished | None,
    price: Price,
    held: int | None,
    upstream_cost: Price | None = None,
) -> Outcome:
    """The outcome of a request that ended so, without side effects. ``audited`` is what the audit
    saw of an agent's job (``None``: the upstream served, or no job ran), ``price`` the server's,
    ``held`` the hold (``None``: nothing is billed), ``upstream_cost`` what the upstream charges the
    platform when it served. The audit's findings are evidence; what the consumer pays is what the
    coordinator counted, never more than the agent claims, nothing for a job the agent broke."""
    job, failure = ending.job, ending.failure
    evidence: list[tuple[str, str]] = []
    billable, counted = True, None
    if audited is not None and failure is not None:
        kind = trust.failure_evidence(failure, started=job is not None and job.first_at is not None)
        if kind is not None:
            evidence.append((kind, f"{failure.code}: {failure.message}"))
            billable = failure.code not in trust.UNPAID_FAILURES
    elif audited is not None and ending.completed:
        verdict = audit.judge(audited)
        # A consumer's prompt can ask for a repeated word or stop at once: output that fails the
        # sanity checks is not billed, but only verification jobs (our own prompts) count it against
        # the agent, so nobody can bench an agent by asking for garbage.
        evidence = [(kind, detail) for kind, detail in verdict.findings if kind != trust.BAD_OUTPUT]
        evidence = evidence or [(trust.COMPLETED, "")]
        billable = verdict.billable
        usage = audited.reported
        if usage is not None:
            completion = max(0, min(usage.completion_tokens, audit.counted_tokens(audited)))
            prompt = usage.prompt_tokens if verdict.prompt_tokens is None else verdict.prompt_tokens
            if (prompt, completion) != (usage.prompt_tokens, usage.completion_tokens):
                counted = msgspec.structs.replace(usage, prompt_tokens=prompt, completion_tokens=completion)
    if job is None or held is None:
        return Outcome(ending, tuple(evidence), billable)
    bill = meter.bill(completed=ending.completed, stream=stream, consumer_left=ending.consumer_left, counted=counted)
    amount = bill.amount(price) if billable else 0
    spent = 0
    if upstream_cost is not None:
        used = bill.reported or bill
        spent = upstream_cost.cost(used.prompt_tokens, used.completion_tokens)
    return Outcome(ending, tuple(evidence), billable, bill, min(amount, held), bill.capped or amount > held, spent)


@dataclass(frozen=True)
class Piece:
    """Part of a stream as the consumer sees it: payloads, and with the last piece how it ended
    (``done``, or the error to send as its last event)."""

    payloads: list[bytes]
    done: bool = False
    error: Refusal | None = None


@dataclass(eq=False)
class Call:
    """One request in flight (a chat, a completion or an embedding: ``kind``): what it may cost,
    what it did, and how it ended (once)."""

    pool: PoolState
    record: RequestRecord
    data: ConsumerRequest
    body: bytes  # what reaches the backend (:func:`coordinator.market.forward.backend_body`)
    meter: Meter
    routing: Routing
    offers: Offers  # what the hold must cover
    limits: dict[str, str]  # rate-limit headers for every response
    started: float = field(default_factory=time.perf_counter)
    token_estimate: int = 0
    reservation: Reservation | None = None
    route: Route | None = None
    reader: JobReader | None = None
    ended: bool = False
    tier: str | None = None  # the key policy's privacy tier (``x_pool.tier``)
    auto: AutoChoice | None = None  # the pool's choice for ``model: "auto"`` (``x_pool.auto``)
    caps: dict[str, int] = field(default_factory=dict)  # the key policy's spend caps, nano-USD by period
    budget: BudgetHold | None = None  # the worst case, carved out of the key's spend caps
    price: Price | None = None  # what it was charged at (``x_pool.price_per_1m``), once concluded
    kind: str = CHAT  # the job kind it runs as
    output_bytes: int = 0  # what the job may send in all (0: what its completion bound allows)

    # --- running ---------------------------------------------------------------------------

    async def start(self) -> Attempt:
        """Hold the worst case (402 when the credit can't cover it) and dispatch; the attempt that
        produced a first output. :class:`Refusal` when nobody could take it or it failed first."""
        pool, data = self.pool, self.data
        try:
            ceiling = await self._hold()
        except InsufficientCredits as exc:
            if exc.owed > 0:
                raise self.refuse(
                    402,
                    errors.INSUFFICIENT_CREDITS,
                    f"Your account owes {format_usd(exc.owed)}: a payment was refunded or disputed after its credits "
                    "were spent. Add credits to pay it; requests resume once it is paid.",
                ) from None
            raise self.refuse(
                402,
                errors.INSUFFICIENT_CREDITS,
                f"Insufficient credits: this request may cost up to {format_usd(exc.needed)} (prompt and max_tokens "
                f"at the lowest price on offer) and {format_usd(exc.available)} is available. Add credits or lower "
                "max_tokens.",
            ) from None
        if self.caps and self.reservation is not None:
            await self._within_caps(self.reservation.amount)
        attempt = await pool.dispatcher.start(
            data.models,
            self.body,
            stream=data.stream,
            want_usage=bool(data.stream and data.stream_options and data.stream_options.include_usage),
            routing=self.routing,
            max_price=ceiling,
            budget=self.output_bytes or output_budget(self.meter.completion_bound, bool(data.logprobs)),
        )
        if attempt is None:
            raise self.no_capacity()
        self.route = attempt.route
        self.record.model = attempt.route.model
        if isinstance(attempt.first, Failure):
            attempt.job.cancel()
            self.attribute(attempt.job)
            raise self.failed(attempt.first)
        self.reader = JobReader(attempt.job, attempt.first, bound=self.meter.completion_bound)
        return attempt

    async def _within_caps(self, amount: int) -> None:
        """Carve the worst case out of the key's spend caps (403 when one has no room left) and say
        what remains in the response's headers."""
        budgets, key_id = self.pool.budgets, self.record.key_id or 0
        try:
            self.budget = await budgets.reserve(key_id, self.caps, amount)
        except CapReached as exc:
            raise self.refuse(
                403,
                errors.POLICY_BLOCKED,
                f"This key's {'daily' if exc.period == DAY else 'monthly'} spend cap ({format_usd(exc.cap)}) has no "
                f"room for this request's worst case ({format_usd(amount)}) (rule: spendCap.{exc.period}).",
            ) from None
        for kind, left in budgets.remaining(key_id, self.caps).items():
            self.limits[f"x-pool-budget-remaining-{kind}"] = f"{nano_to_usd(left):.6f}"

    async def _hold(self) -> Price:
        """Reserve the worst case at the highest prices on offer, or, if the consumer's credit cannot
        cover that, at the cheapest offer's (the request then goes only to offers that cheap): one
        dear agent cannot price a consumer out of the cheap ones. Returns the prices the hold covers;
        :class:`InsufficientCredits` if even the cheapest is out of reach."""
        meter, leases, offers = self.meter, self.pool.leases, self.offers
        ceiling = offers.ceiling
        assert ceiling is not None  # admission refused the request when nobody could serve it
        try:
            self.reservation = await leases.reserve(self.record, meter.hold_amount(ceiling))
            return ceiling
        except InsufficientCredits:
            cheapest = offers.cheapest(meter.hold_amount)
            if meter.hold_amount(cheapest) >= meter.hold_amount(ceiling):
                raise
        self.reservation = await leases.reserve(self.record, meter.hold_amount(cheapest))
        return cheapest

    async def whole(self) -> bytes:
        """Non-stream: the reply as the consumer sees it. The agent says it is alive while its
        backend works; silence for ``POOL_WHOLE_REPLY_SILENCE`` ends the job as a failure
        (:class:`Refusal`)."""
        body, x_pool = await self.reply()
        return self.show(body, x_pool)

    async def reply(self, unusable: Callable[[bytes], str | None] | None = None) -> tuple[bytes, XPool | None]:
        """Non-stream: the backend's reply as it came, and the ``x_pool`` to show with it. A reply
        ``unusable`` finds a problem with (an embedding's vectors that don't fit its inputs) fails
        the job: nothing is billed and the agent is blamed (:class:`Refusal`)."""
        reader = self._reader()
        body = await reader.whole(self.pool.dispatcher.silence(stream=False))
        if isinstance(body, Failure):
            raise self.failed(body, reader.job)
        problem = unusable(body) if unusable is not None else None
        if problem is not None:
            raise self.failed(Failure(errors.BACKEND_ERROR, f"the reply is unusable: {problem}", True), reader.job)
        assert isinstance(reader.end, Done)
        self.meter.usage = reader.end.usage
        return body, self.end(Ending(200, job=reader.job, completed=True))

    async def relay(self) -> AsyncGenerator[Piece, None]:
        """A stream as the consumer sees it, piece by piece; the last piece says how it ended.
        Output past the request's bound is cut (the job too); if the consumer goes away first,
        the job is cancelled and the consumer pays for what it took."""
        reader = self._reader()
        job, first_at = reader.job, time.perf_counter()
        try:
            async with contextlib.aclosing(reader.batches(self.pool.settings.idle_timeout)) as batches:
                async for batch in batches:
                    end = reader.end
                    if end is None:
                        yield Piece([self.show(payload) for payload in batch])
                    elif isinstance(end, Done):
                        self.meter.usage = end.usage
                        x_pool = self.end(Ending(200, job=job, completed=True, first_at=first_at))
                        last = len(batch) - 1
                        shown = [self.show(payload, x_pool if i == last else None) for i, payload in enumerate(batch)]
                        yield Piece(shown, done=True)
                    else:
                        log.warning("stream failed after first chunk", extra={"job_id": job.job_id, "code": end.code})
                        error = self.failed(end, job, first_at)
                        yield Piece([self.show(payload) for payload in batch], error=error)
        finally:
            if not job.finished:
                log.info("consumer went away, cancelling job", extra={"job_id": job.job_id})
                job.cancel()
            self.end(Ending(499, CONSUMER_GONE, job, first_at=first_at))

    def abandon(self) -> None:
        """After a stream response: if the relay never ran to its end, stop the job and bill what went out."""
        if not self.ended and self.reader is not None:
            self.reader.job.cancel()
            self.end(Ending(499, CONSUMER_GONE, self.reader.job))

    def _reader(self) -> JobReader:
        if self.reader is None:
            raise RuntimeError("the call has not started")
        return self.reader

    # --- what the consumer sees -------------------------------------------------------------

    def show(self, payload: bytes, x_pool: XPool | None = None) -> bytes:
        """The payload as the consumer sees it (:mod:`coordinator.market.present`); the first thing the
        backend said of itself goes to the request log."""
        record = self.record
        shown, said = present(payload, record.id, record.model, x_pool)
        if record.backend_model is None and said.model is not None:
            record.backend_model = said.model
        if record.backend_id is None and said.id is not None:
            record.backend_id = said.id
        return shown

    def refuse(self, status: int, code: str, message: str, param: str | None = None, **headers: str) -> Refusal:
        """End the call as refused; the :class:`Refusal` to raise."""
        self.end(Ending(status, code))
        return Refusal(status, code, message, param, {**self.limits, **headers})

    def failed(self, failure: Failure, job: Job | None = None, first_at: float | None = None) -> Refusal:
        """End the call as failed (``job``: the job that failed, judged by the audit); the
        :class:`Refusal` to raise, or to send as a stream's last event."""
        status, code, message = provider_error(failure)
        self.end(Ending(status, code, job, failure=failure, first_at=first_at))
        return Refusal(status, code, message, None, self.limits)

    def no_capacity(self) -> Refusal:
        retry_after = self.pool.settings.no_capacity_retry_after
        names = ", ".join(f"`{slug}`" for slug in self.data.models)
        plain = dataclasses.replace(DEFAULT_ROUTING, kind=self.kind)
        matching = " matching the request's `provider` preferences" if self.routing != plain else ""
        return self.refuse(
            503,
            errors.NO_CAPACITY,
            f"No provider{matching} has capacity for {names} right now. Retry in {retry_after} s.",
            **{"retry-after": str(retry_after)},
        )

    # --- the outcome, consumed once ---------------------------------------------------------

    def attribute(self, job: Job) -> None:
        """Log who served (or last tried) the request: an agent, or the upstream as the fallback."""
        record, agent = self.record, job.agent
        record.fallback = job.fallback
        record.agent_id = agent.agent_id if agent is not None else None
        record.agent_token_id = agent.token_id if agent is not None else None
        record.provider_user_id = agent.user_id if agent is not None else None

    def end(self, ending: Ending) -> XPool | None:
        """Conclude the request's :class:`Outcome` and give it to each of its consumers, once: the
        agent's trust gets the evidence, the lease books the cost (the rest of the hold returns to
        it) and the request log queues the row, the agent's token learns its speed, stats and
        history count it, clawback keeps the job until a canary vouches for the agent. Only the
        first call counts; returns the reply's ``x_pool``."""
        if self.ended:
            return None
        self.ended = True
        outcome = self._conclude(ending)
        pool, record, job = self.pool, self.record, ending.job
        agent = job.agent if job is not None else None
        if agent is not None:
            assert job is not None
            for kind, detail in outcome.evidence:
                pool.trust.witness(agent, kind, detail, job.job_id)
        self._log(outcome)
        charge = None
        if job is not None and self.reservation is not None:
            charge = Charge(outcome.cost, record.provider_user_id, outcome.upstream_cost)
        if agent is not None and job is not None and job.first_at is not None and ending.completed and outcome.billable:
            ttft_ms, speed = registry.observe(
                agent,
                job.slug,
                record.completion_tokens,
                assigned_at=job.assigned_at,
                first_at=job.first_at,
                stream=record.stream,
            )
            if pool.relay is not None and not agent.local:  # its replica keeps its averages
                pool.relay.report_timings(agent, job.slug, ttft_ms, speed)
        if job is not None or ending.status in (502, 503):
            ok = ending.status == 200
            pool.stats.record(record.model, record.latency_ms, fallback=record.fallback, ok=ok)
            pool.history.record(record.model, record.latency_ms, fallback=record.fallback, ok=ok)
        pool.leases.finish(record, charge, self.reservation, self.token_estimate)
        pool.budgets.finish(self.budget, record.cost)
        pool.metrics.request(record)
        if agent is not None and job is not None:
            pool.clawback.served(agent.token_id, agent.agent_id, job.slug, record)  # until vouched for
        route = self.route
        profile = self.pool.providers.get(agent.user_id) if agent is not None else None
        price = self.price if self.price is not None else self._price(job)
        return XPool(
            request_id=record.id,
            provider=record.provider_user_id if record.provider_user_id is not None else "platform",
            agent=record.agent_id,
            fallback=record.fallback,
            latency_ms=record.latency_ms,
            cost_usd=nano_to_usd(record.cost),
            ttft_ms=record.ttft_ms,
            model=record.model,
            route=route.reason if route else None,
            candidates=route.candidates if route else None,
            attempts=route.attempts if route else None,
            tier=self.tier,
            auto=self.auto,
            replica=pool.replica,
            agent_replica=(agent.replica or pool.replica) if agent is not None else None,
            provider_slug=(profile.slug if profile else f"provider-{agent.user_id}")
            if agent is not None
            else "platform",
            provider_name=(profile.name if profile else f"Provider {agent.user_id}")
            if agent is not None
            else "Platform",
            price_per_1m=PricePerMillion(
                nano_per_token_to_usd_per_million(price.input), nano_per_token_to_usd_per_million(price.output)
            ),
            routed_by=routed_by(self.routing),
        )

    def _charged(self, job: Job | None) -> Price:
        """The price the request is charged at, kept for ``x_pool`` (the upstream's may move after)."""
        self.price = self._price(job)
        return self.price

    def _price(self, job: Job | None) -> Price:
        """The price the request is charged at: its agent's offer, or the upstream's for the model."""
        agent = job.agent if job is not None else None
        model = self.record.model
        return offer_price(agent, model) if agent is not None else self.pool.upstream.price_for(model)

    def _conclude(self, ending: Ending) -> Outcome:
        job, reader = ending.job, self.reader
        if reader is not None:
            self.meter.delivered = reader.delivered  # what the consumer took
        agent = job.agent if job is not None else None
        audited = None
        if job is not None and agent is not None and reader is not None:
            info = self.pool.directory.get(job.slug)
            audited = reader.audited(self.record.stream, info.parameter_count if info else None, self.meter)
        upstream = self.pool.upstream
        return conclude(
            ending,
            self.meter,
            stream=self.record.stream,
            audited=audited,
            price=self._charged(job),
            held=self.reservation.amount if self.reservation is not None else None,
            upstream_cost=upstream.cost if job is not None and agent is None else None,
        )

    def _log(self, outcome: Outcome) -> None:
        """The request log's row, from the outcome."""
        ending, record = outcome.ending, self.record
        record.status, record.error_code = ending.status, ending.code
        record.latency_ms = round((time.perf_counter() - self.started) * 1000)
        first_at = ending.first_at
        record.ttft_ms = None if first_at is None else round((first_at - self.started) * 1000)
        if ending.job is not None:
            self.attribute(ending.job)
        bill = outcome.bill
        if bill is not None:
            record.prompt_tokens, record.completion_tokens = bill.prompt_tokens, bill.completion_tokens
            if bill.reported is not None:
                record.reported_prompt_tokens = bill.reported.prompt_tokens
                record.reported_completion_tokens = bill.reported.completion_tokens
            record.usage_capped, record.cost = outcome.capped, outcome.cost


async def admit(
    pool: PoolState, principal: Principal, record: RequestRecord, data: ConsumerRequest, raw: bytes
) -> Call:
    """Check what costs nothing, in order of cost: the model, the content, the key's rate limits,
    whether anyone can serve. The admitted :class:`Call`, or :class:`Refusal`."""
    models = data.models
    kind = kind_of(data)
    record.model, record.stream = models[0], data.stream
    routing = Routing.of(data.provider, pool.providers.resolve, kind)
    call = Call(pool, record, data, b"", Meter(prompt_bound(raw), 0, 0), routing, placement.NO_OFFERS, {}, kind=kind)
    policy = principal.policy
    if policy is not None:
        record.project = policy.project or None
        if policy.paused:  # before anything else, ``auto`` too
            raise call.refuse(403, errors.API_DISABLED, "This key is paused by its owner; resume it to use it again.")
    if models == [""]:  # left out: ``auto`` for a key whose policy names its models, else required
        if policy is None or not policy.models or kind != CHAT:
            message = "`model` is required: name a model (GET /v1/models lists them), or `auto` to let the pool pick."
            raise call.refuse(400, errors.INVALID_REQUEST, message, "model")
        models = [AUTO]
    if models == [AUTO]:
        if not isinstance(data, ChatCompletionRequest):
            message = "`auto` picks among chat models: name the model (GET /v1/models lists them)."
            raise call.refuse(400, errors.INVALID_REQUEST, message, "model")
        try:
            call.auto = _auto(pool, policy, data, raw)
        except NothingFits as exc:
            if exc.serving:
                retry = str(pool.settings.no_capacity_retry_after)
                raise call.refuse(503, errors.NO_CAPACITY, str(exc), "model", **{"retry-after": retry}) from None
            raise call.refuse(400, errors.INVALID_REQUEST, str(exc), "model") from None
        data.model = call.auto.chosen
        models = data.models
        record.model = models[0]
    bound = output_bound(data, _model_cap(pool, models))
    call.meter = Meter(prompt_bound(raw), bound, prompt_estimate(data))
    if pool.refusing:
        raise call.refuse(
            503,
            errors.SHUTTING_DOWN,
            "This coordinator is shutting down; retry the request (another one will take it).",
            **{"retry-after": "1"},
        )
    record.end_user = data.user[:256] if data.user else None
    record.tags = msgspec.json.encode(data.metadata).decode() if data.metadata else None
    for slug in models:
        if not _known_model(pool, slug):
            raise call.refuse(
                404,
                errors.MODEL_NOT_FOUND,
                f"The model `{slug}` does not exist in this pool. GET /v1/models lists the available models.",
                "model",
            )
        info = pool.directory.get(slug)
        if info is not None and info.embeds != (kind == EMBEDDING):
            message = (
                f"`{slug}` is an embedding model: POST /v1/embeddings."
                if info.embeds
                else f"`{slug}` is not an embedding model (GET /v1/models lists each model's useCases)."
            )
            raise call.refuse(400, errors.INVALID_REQUEST, message, "model")
        if policy is not None and not policy.allows(slug, info.family if info else None):
            raise call.refuse(
                403,
                errors.POLICY_BLOCKED,
                f"This key's policy does not allow the model `{slug}` (rule: models).",
                "model",
            )
    if policy is not None:
        call.routing = routing = _under_policy(pool, routing, policy)
        call.tier = policy.privacy
        call.caps = policy.caps()
    problem = content_problem(data)
    if problem is not None:
        raise call.refuse(400, errors.INVALID_REQUEST, problem[1], problem[0])
    call.body = backend_body(raw, bound, kind)
    if policy is not None and policy.dlp and has_token_ids(data):
        raise call.refuse(
            403,
            errors.POLICY_BLOCKED,
            "This key's policy checks prompts for sensitive data, which token ids hide: send text (rule: dlp).",
            "input" if kind == EMBEDDING else "prompt",
        )
    if policy is not None and policy.dlp:
        if len(call.body) > DLP_INLINE_BYTES:  # a big prompt is scanned off the event loop: others go on meanwhile
            protected = await asyncio.to_thread(protect, call.body, policy.dlp)
        else:
            protected = protect(call.body, policy.dlp)
        record.dlp = msgspec.json.encode(protected.found).decode() if protected.found else None
        if protected.blocked is not None:
            raise call.refuse(
                403,
                errors.POLICY_BLOCKED,
                f"The prompt holds what the `{protected.blocked}` detector looks for, which this key's policy "
                f"blocks (rule: dlp.{protected.blocked}).",
                "messages",
            )
        call.body = protected.body
        if protected.private is not None and policy.privacy == policies.ANY:  # trusted agents or the upstream
            call.routing = routing = dataclasses.replace(
                routing, min_trust=max(routing.min_trust, pool.settings.trusted_tier_trust)
            )
            call.tier = policies.TRUSTED
    estimate = len(raw) // 4 + (data.max_completion_tokens or data.max_tokens or 0)
    decision = await pool.key_limits.admit(principal.credential_id, estimate, principal.rpm, principal.tpm)
    if not decision.allowed:
        raise call.refuse(
            429,
            errors.RATE_LIMIT_EXCEEDED,
            f"Rate limit reached for this key. Retry in {decision.retry_after} s.",
            **decision.headers,
        )
    call.token_estimate, call.limits = estimate, decision.headers
    if kind == CHAT:
        pool.verifier.observe(raw)  # canaries copy the shapes of admitted requests
    call.offers = placement.prices(
        pool.registry, pool.upstream, models, routing, trust_floor=pool.settings.trust_threshold
    )
    if not call.offers:
        raise call.no_capacity()
    return call


def _auto(pool: PoolState, policy: KeyPolicy | None, data: ChatCompletionRequest, raw: bytes) -> AutoChoice:
    """The model ``auto`` means for this request (:mod:`coordinator.market.auto`), under the key's policy."""
    routing = Routing.of(data.provider, pool.providers.resolve)
    if policy is not None:
        routing = _under_policy(pool, routing, policy)
    fmt = data.response_format
    needs = auto.Needs(
        prompt_tokens=prompt_bound(raw),
        output_tokens=data.max_completion_tokens or data.max_tokens or auto.DEFAULT_OUTPUT,
        tools=bool(data.tools),
        json=fmt is not None and fmt.type != "text",
    )
    floor = pool.settings.trust_threshold

    def offers(slug: str) -> placement.Offers:
        return placement.prices(pool.registry, pool.upstream, [slug], routing, trust_floor=floor)

    return auto.choose(
        pool.directory,
        sorted(set(pool.directory.entries) | set(pool.upstream.models)),
        needs,
        policy.allows if policy is not None else (lambda slug, family: True),
        offers,
        lambda price: price.cost(needs.prompt_tokens, needs.output_tokens),
    )


def _under_policy(pool: PoolState, routing: Routing, policy: KeyPolicy) -> Routing:
    """The request's routing narrowed by its key's policy: the lower price cap of the two, and
    only the agents (or the upstream) the privacy tier lets see the prompt."""
    if policy.max_price is not None:
        capped = Price(placement.nano_cap(policy.max_price.prompt), placement.nano_cap(policy.max_price.completion))
        if routing.max_price is not None:
            capped = Price(min(capped.input, routing.max_price.input), min(capped.output, routing.max_price.output))
        routing = dataclasses.replace(routing, max_price=capped)
    if policy.privacy == policies.TRUSTED:
        routing = dataclasses.replace(routing, min_trust=max(routing.min_trust, pool.settings.trusted_tier_trust))
    elif policy.privacy == policies.PLATFORM:
        only = frozenset({placement.PLATFORM})
        routing = dataclasses.replace(routing, only=only, order=())  # the request's allow_fallbacks still holds
    return routing


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


def provider_error(failure: Failure) -> tuple[int, str, str]:
    """HTTP status, code and message for a failure that reaches the consumer: a backend refusing
    the request itself (400/413/422) is the consumer's error, anything else the provider's."""
    if trust.is_rejection(failure):
        return (413 if failure.status == 413 else 400), errors.INVALID_REQUEST, failure.message
    return 502, errors.PROVIDER_ERROR, f"The provider failed: {failure.message}"
