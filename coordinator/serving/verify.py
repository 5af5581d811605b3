"""Verification jobs (canaries), run by APScheduler among consumer traffic.

A canary is an ordinary job: the same ``job.assign`` message, a prompt from a large pool (some of it
the operator's own) in the shape of a recent consumer request (:mod:`coordinator.trust.canaries`), so an
agent cannot tell it from a consumer's by its form. Its answer is audited like any job (usage, speed,
output) and compared with the references for that model, quantisation and prompt
(:mod:`coordinator.trust.references`): answers of the platform upstream, asked the same prompt when it
serves the model, and of providers the operator vouches for. A vouched provider's answer is judged
only by the other sources' references, and becomes its own reference when it agrees with those (or
there are none). Answers given before a reference exists wait for it and are judged then. Honest
agents running the same weights agree at temperature 0; a different model does not. Canaries are
not billed and not paid. A pass vouches for the consumer jobs the agent served for that model since
its last pass (when the operator has prompts of its own, only a pass on one of those: the shipped
ones are public); failures on distinct prompts, once confirmed, refund them (``clawback.py``).
Canary evidence names no job and no prompt, so a provider's evidence list does not say which of
its jobs were canaries. An embedding model's canary asks for the prompt's embedding, as a consumer's
embeddings request would, and its vector is compared with the references' by cosine similarity. An
offer that serves completions gets completion canaries too (all of them when it serves no chat),
judged against references of completions, so an agent cannot serve chat honestly and completions
from a cheaper model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import msgspec

from coordinator.market import vectors
from coordinator.market.catalog import Directory
from coordinator.market.forward import backend_body
from coordinator.market.registry import ConnectedAgent, Registry
from coordinator.money.clawback import Verdicts
from coordinator.money.metering import output_bound
from coordinator.serving.dispatch import Dispatcher
from coordinator.serving.jobreader import JobReader
from coordinator.serving.jobs import BUDGET_BASE, output_budget
from coordinator.trust import audit, canaries
from coordinator.trust import scores as trust
from coordinator.trust.canaries import Canary, Prompts, Shapes
from coordinator.trust.references import PLATFORM, UNLABELED, Answer, Comparison, ReferenceBook, agrees
from shared.backend import Chunk, Done, Failure
from shared.openai import ChatCompletionRequest, CompletionRequest
from shared.protocol import CHAT, COMPLETION, EMBEDDING, ModelOffer

log = logging.getLogger(__name__)

CANARY = "canary: "  # how evidence from verification jobs begins
# A completion canary's references are kept apart from chat's, under the slug with this suffix (a
# slug never holds ``#``): the same prompt completed is another text than answered in a chat.
COMPLETION_KEY = "#completion"
COMPLETION_SHARE = 0.3  # of the canaries to an offer that serves chat and completions, completions
JUDGED_SHARE = 0.5  # without an upstream, canaries that ask a prompt a reference already answers


def _verifiable(agent: ConnectedAgent) -> list[str]:
    """The models of ``agent`` a canary can check: every one of a kind there are canaries for."""
    return sorted(slug for slug, offer in agent.models.items() if any(map(offer.serves, (CHAT, COMPLETION, EMBEDDING))))


@dataclass
class Verifier:
    registry: Registry
    dispatcher: Dispatcher
    book: trust.TrustBook
    clawback: Verdicts  # the clawback, or with replicas every replica's
    first_chunk_timeout: float
    idle_timeout: float
    references: ReferenceBook
    prompts: Prompts = field(default_factory=Prompts)
    shapes: Shapes = field(default_factory=Shapes)
    cap: int = canaries.CAP
    default_output_tokens: int = 4096  # a model's output cap when the directory gives no context window
    done: dict[int, int] = field(default_factory=dict)  # canaries run per agent token
    rng: random.Random = field(default_factory=random.Random)
    _digests: dict[str, dict[str, str]] = field(default_factory=dict)  # per model: prompt digest -> prompt
    _secret: set[str] = field(default_factory=set)  # digests of the operator's prompts
    _asking: set[tuple[str, str]] = field(default_factory=set)  # (model, digest) the upstream is asked
    _running: set[asyncio.Task[None]] = field(default_factory=set)
    sizes: dict[str, int | None] = field(default_factory=dict)  # an embedding model's vector size, per model

    def observe(self, raw: bytes) -> None:
        """Note an admitted consumer request's shape (one in a few is read), for canaries to copy."""
        self.shapes.observe(raw)

    def pick(self) -> tuple[ConnectedAgent, str] | None:
        """The agent to verify next: the one with the fewest canaries, ties at random; and a model."""
        free = [
            a for a in self.registry.local() if not a.draining and a.in_flight < a.max_concurrency and _verifiable(a)
        ]
        if not free:
            return None
        self.rng.shuffle(free)
        agent = min(free, key=lambda a: self.done.get(a.token_id, 0))
        return agent, self.rng.choice(_verifiable(agent))

    def start_one(self, directory: Directory) -> None:
        """Start a canary on the agent verified least so far, in the background (canaries run
        concurrently, each bounded by the agent's own capacity)."""
        picked = self.pick()
        if picked is None:
            return
        agent, slug = picked
        info = directory.get(slug)
        label = agent.models[slug].quantization
        quantization = label if info is not None and label in info.quantizations else UNLABELED
        parameters = info.parameter_count if info is not None else None
        model_cap = info.context_window if info is not None and info.context_window else None
        self.sizes[slug] = info.dimensions if info is not None else None
        task = asyncio.create_task(self._run_logged(agent, slug, quantization, parameters, model_cap))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_logged(
        self, agent: ConnectedAgent, slug: str, quantization: str, parameter_count: int | None, model_cap: int | None
    ) -> None:
        try:
            await self.run(agent, slug, quantization, parameter_count, model_cap)
        except Exception:  # one canary's trouble must not stop the next
            log.exception("verification job failed", extra={"agent_id": agent.agent_id})

    def close(self) -> None:
        for task in list(self._running):
            task.cancel()

    async def refresh(self) -> None:
        """Read references and vouched providers again; judge the answers that can be judged now."""
        for verdict in await self.references.refresh():
            self._settle(verdict)

    def _digests_of(self, slug: str) -> dict[str, str]:
        digests = self._digests.get(slug)
        if digests is None:
            prompts = (*self.prompts.shipped, *self.prompts.operator)
            digests = self._digests[slug] = {canaries.digest(slug, prompt): prompt for prompt in prompts}
            self._secret.update(canaries.digest(slug, prompt) for prompt in self.prompts.operator)
        return digests

    def _public(self, slug: str, prompt: str) -> bool:
        """Whether ``prompt`` (a digest) is a shipped one while the operator has prompts of its own."""
        self._digests_of(slug)
        return bool(self.prompts.operator) and prompt not in self._secret

    def prompt_for(self, slug: str, source: str | None) -> str:
        """A prompt to ask: for a reference source, one others' answers wait on; half the time (when
        no upstream answers every prompt, or for a source) one that can be judged now; else any."""
        digests = self._digests_of(slug)
        if source is not None:
            waiting = [digests[d] for d in self.references.waiting_for(slug) if d in digests]
            if waiting:
                return self.rng.choice(waiting)
        if (source is not None or not self.dispatcher.upstream.serves(slug)) and self.rng.random() < JUDGED_SHARE:
            judged = [prompt for d, prompt in digests.items() if self.references.has(slug, d, other_than=source)]
            if judged:
                return self.rng.choice(judged)
        return self.prompts.draw(self.rng)

    async def run(
        self,
        agent: ConnectedAgent,
        slug: str,
        quantization: str = UNLABELED,
        parameter_count: int | None = None,
        model_cap: int | None = None,
    ) -> None:
        """Send one canary to ``agent`` and count what it shows as evidence; ``quantization`` is the
        label whose references judge it (one the directory lists, else unlabeled)."""
        source = self.references.source_of(agent)
        kind = self._kind(agent.models[slug])
        model = slug + COMPLETION_KEY if kind == COMPLETION else slug  # whose references judge it
        prompt = self.prompt_for(model, source)
        key = canaries.digest(model, prompt)
        self.done[agent.token_id] = self.done.get(agent.token_id, 0) + 1
        asking = None
        if source is None and not self.references.has(model, key) and self.dispatcher.upstream.serves(slug, kind):
            asking = asyncio.create_task(self._ask_upstream(slug, prompt, key, kind))
        try:
            cap = model_cap or self.default_output_tokens
            if kind == EMBEDDING:
                result = await self._embedding(agent, slug, prompt, parameter_count)
            elif kind == COMPLETION:
                canary = canaries.completion(slug, prompt, self.cap, stream=self.rng.random() < 0.5)
                result = await self._answer(agent, slug, canary, parameter_count, cap, COMPLETION)
            else:
                canary = canaries.build(self.shapes.draw(self.rng), slug, prompt, self.cap)
                result = await self._answer(agent, slug, canary, parameter_count, cap)
        finally:
            if asking is not None:
                await asking
        if result is None:
            return
        answer, clean = result
        answered = time.monotonic()
        if source is None:
            verdicts = self.references.judge(model, quantization, key, agent, answer, answered)
        else:  # the operator trusts this provider: judged by the other sources, if any; a reference if agreeing
            others = self.references.references(model, quantization, key, other_than=source)
            passed = any(agrees(answer, reference) for reference in others)
            verdicts = [Comparison(agent, passed, answered, model, key)] if others else []
            if not others:
                self.clawback.vouched(agent.token_id, agent.agent_id, slug, answered)
            if clean and (passed or not others):
                verdicts += await self.references.contribute(model, quantization, key, source, agent.user_id, answer)
        for verdict in verdicts:
            self._settle(verdict)

    def _kind(self, offer: ModelOffer) -> str:
        """The kind of the next canary to an offer: an embedding model's embed; an offer that serves
        completions gets some completion canaries (all, when it serves no chat), the rest chat."""
        if offer.serves(EMBEDDING):
            return EMBEDDING
        if offer.serves(COMPLETION) and (not offer.serves(CHAT) or self.rng.random() < COMPLETION_SHARE):
            return COMPLETION
        return CHAT

    async def _answer(
        self,
        agent: ConnectedAgent,
        slug: str,
        canary: Canary,
        parameter_count: int | None,
        model_cap: int,
        kind: str = CHAT,
    ) -> tuple[Answer, bool] | None:
        """Run the canary on the agent and audit it: its answer and whether the audit found nothing;
        ``None`` if it failed. The agent gets the body a consumer's request in this shape would reach
        it as (:func:`coordinator.market.forward.backend_body`), output limit and all."""
        asked: ChatCompletionRequest | CompletionRequest = (
            msgspec.json.decode(canary.body, type=CompletionRequest)
            if kind == COMPLETION
            else msgspec.json.decode(canary.body, type=ChatCompletionRequest)
        )
        bound = output_bound(asked, model_cap)
        job = await self.dispatcher.assign(
            agent,
            slug,
            backend_body(canary.body, bound, kind),
            stream=canary.stream,
            want_usage=canary.want_usage,
            budget=output_budget(bound, logprobs=False),
            kind=kind,
        )
        first = await job.next(self.first_chunk_timeout)
        reader = JobReader(job, first, bound=bound, stop_after=canary.limit if canary.cut else None)
        if canary.stream:
            async with contextlib.aclosing(reader.batches(self.idle_timeout)) as batches:
                async for _ in batches:
                    pass
        else:
            await reader.whole(self.dispatcher.silence(stream=False))
        if isinstance(reader.end, Failure):
            job.cancel()
            self.book.witness_failure(agent, reader.end, started=reader.started, job_id=job.job_id, origin=CANARY)
            return None
        verdict = audit.judge(reader.audited(canary.stream, parameter_count))
        for kind, detail in verdict.findings:
            self.book.witness(agent, kind, CANARY + detail)
        output = reader.output
        complete = not reader.cut and output.finish_reason == "stop"
        return Answer(output.text, complete, canary.limit), not verdict.findings

    async def _embedding(
        self, agent: ConnectedAgent, slug: str, prompt: str, parameter_count: int | None
    ) -> tuple[Answer, bool] | None:
        """Ask the agent for the prompt's embedding, as a consumer's embeddings request reaches it,
        and audit it: its vector as an answer and whether the audit found nothing; ``None`` if it
        failed or sent no usable vector (evidence either way)."""
        raw = msgspec.json.encode({"model": slug, "input": prompt})
        job = await self.dispatcher.assign(
            agent,
            slug,
            backend_body(raw, 0, EMBEDDING),
            stream=False,
            want_usage=False,
            budget=BUDGET_BASE + vectors.reply_budget(1, self.sizes.get(slug)),
            kind=EMBEDDING,
        )
        reader = JobReader(job, await job.next(self.first_chunk_timeout))
        body = await reader.whole(self.dispatcher.silence(stream=False))
        if isinstance(body, Failure):
            self.book.witness_failure(agent, body, started=reader.started, job_id=job.job_id, origin=CANARY)
            return None
        found = vectors.vectors(body, 1, self.sizes.get(slug))
        if isinstance(found, str):
            self.book.witness(agent, trust.BAD_OUTPUT, f"{CANARY}{slug}: {found}")
            return None
        verdict = audit.judge(reader.audited(False, parameter_count))
        for kind, detail in verdict.findings:
            self.book.witness(agent, kind, CANARY + detail)
        return Answer(vectors.as_text(found[0]), True, 0), not verdict.findings

    async def _ask_upstream(self, slug: str, prompt: str, key: str, kind: str = CHAT) -> None:
        """Ask the platform upstream for its reference answer to ``prompt`` (once at a time)."""
        if (slug, key) in self._asking:
            return
        self._asking.add((slug, key))
        try:
            if kind == EMBEDDING:
                await self._upstream_embedding(slug, prompt, key)
                return
            if kind == COMPLETION:
                body = canaries.completion(slug, prompt, self.cap).body
            else:
                body = canaries.reference_body(slug, prompt, self.cap)
            job = self.dispatcher.run_upstream(slug, body, stream=False, want_usage=False, kind=kind)
            parts: list[bytes] = []
            event = await job.next(self.first_chunk_timeout)
            while isinstance(event, Chunk):
                parts.append(event.data)
                event = await job.next(self.idle_timeout)
            if not isinstance(event, Done):
                job.cancel()
                log.warning("upstream reference failed", extra={"model": slug, "code": event.code})
                return
            output = audit.read_output([b"".join([*parts, *event.tail])])
            if audit.bad_output(output) is not None:
                return
            answer = Answer(output.text, output.finish_reason == "stop", self.cap)
            model = slug + COMPLETION_KEY if kind == COMPLETION else slug
            for verdict in await self.references.contribute(model, UNLABELED, key, PLATFORM, None, answer):
                self._settle(verdict)
        finally:
            self._asking.discard((slug, key))

    async def _upstream_embedding(self, slug: str, prompt: str, key: str) -> None:
        raw = msgspec.json.encode({"model": slug, "input": prompt})
        job = self.dispatcher.run_upstream(
            slug, backend_body(raw, 0, EMBEDDING), stream=False, want_usage=False, kind=EMBEDDING
        )
        body = await JobReader(job, await job.next(self.first_chunk_timeout)).whole(self.idle_timeout)
        found = vectors.vectors(body, 1, self.sizes.get(slug)) if isinstance(body, bytes) else "failed"
        if isinstance(found, str):
            job.cancel()
            log.warning("upstream reference failed", extra={"model": slug, "problem": found})
            return
        answer = Answer(vectors.as_text(found[0]), True, 0)
        for verdict in await self.references.contribute(slug, UNLABELED, key, PLATFORM, None, answer):
            self._settle(verdict)

    def _settle(self, verdict: Comparison) -> None:
        """Evidence from a verdict, and what it means for the agent's consumer jobs."""
        agent, passed, at, model, prompt = verdict
        slug = model.removesuffix(COMPLETION_KEY)  # a completion canary vouches for the model's jobs too
        kind = trust.CANARY_PASSED if passed else trust.CANARY_FAILED
        detail = f"{CANARY}{slug}: answer {'matches' if passed else 'differs from'} the reference"
        self.book.witness(agent, kind, detail)
        if passed:
            # The shipped prompts are public: a cheater can answer those alone honestly. When the
            # operator has prompts of its own, only those vouch for jobs (and clear strikes).
            if not self._public(model, prompt):
                self.clawback.vouched(agent.token_id, agent.agent_id, slug, at)
        else:
            self.clawback.disagreed(agent.token_id, slug, prompt)
