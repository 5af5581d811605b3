"""Verification jobs (canaries), run by APScheduler among consumer traffic.

A canary is an ordinary job: the same ``job.assign`` message, a body shaped like an OpenAI SDK request
(a short user prompt, ``temperature: 0`` and a seed), so an agent cannot tell it from a consumer's.
Its answer is audited like any job (usage, speed, output) and compared with the reference answer for
that model, quantisation and prompt: the answer trusted agents of two providers agreed on. Answers given
before a reference exists wait for it and are judged then. Honest agents running the same weights
agree word for word at temperature 0; a different model does not. Canaries are not billed and not
paid. A verdict vouches for, or refunds, the consumer jobs the agent served for that model since its
last passed canary (``coordinator/clawback.py``).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import random
import time
from dataclasses import dataclass, field

import msgspec

from coordinator import audit, trust
from coordinator.catalog import Directory
from coordinator.clawback import Clawback
from coordinator.dispatch import Dispatcher
from coordinator.metering import text_deltas
from coordinator.registry import ConnectedAgent, Registry
from shared.backend import Chunk, Done
from shared.protocol import Usage

log = logging.getLogger(__name__)

# Short questions with short, deterministic answers at temperature 0.
PROMPTS = (
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a planet in our solar system.",
    "What is the opposite of hot?",
    "How many days are in a week?",
    "What animal says moo?",
    "Give me a synonym for happy.",
    "What is water made of?",
    "Name a fruit that is yellow.",
)
MAX_TOKENS = 24
SEED = 7
SIMILAR = 0.8  # difflib ratio at which two answers count as the same
CANARY = "canary: "  # how evidence from verification jobs begins


def canary_body(slug: str, prompt: str) -> bytes:
    """A request as the OpenAI Python SDK sends it."""
    return msgspec.json.encode(
        {
            "messages": [{"role": "user", "content": prompt}],
            "model": slug,
            "max_tokens": MAX_TOKENS,
            "seed": SEED,
            "stream": True,
            "temperature": 0,
        }
    )


def similar(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a.strip(), b.strip()).ratio() >= SIMILAR


Key = tuple[str, str, int]  # (slug, quantization, prompt index)
Verdict = tuple[ConnectedAgent, bool, float]  # (agent, passed, when it answered: time.monotonic())
UNLABELED = ""  # agents with no (or an unlisted) quantization, judged against any label's reference


@dataclass
class References:
    """Reference answers per model, quantisation and prompt, and the answers waiting for one.

    A reference is an answer trusted agents of two providers agree on: one trusted agent could be a
    cheater that earned its trust, untrusted newcomers could be sybils agreeing with each other, and
    one provider's agents could all run the same wrong model. An unlabeled agent passes if its answer
    matches the reference of any quantisation of the model, so leaving the label off hides nothing."""

    answers: dict[Key, str] = field(default_factory=dict)
    waiting: dict[Key, dict[int, tuple[ConnectedAgent, str, bool, float]]] = field(default_factory=dict)

    def references(self, key: Key) -> list[str]:
        """The reference answers that judge ``key``: its own, or for the unlabeled, any label's."""
        own = self.answers.get(key)
        if own is not None or key[1] != UNLABELED:
            return [] if own is None else [own]
        return [text for (slug, _, prompt), text in self.answers.items() if slug == key[0] and prompt == key[2]]

    def judge(self, key: Key, agent: ConnectedAgent, text: str, trusted: bool, at: float) -> list[Verdict]:
        """Verdicts that ``text`` (answered at ``at``) settles: none while no reference exists."""
        references = self.references(key)
        if references:
            return [(agent, any(similar(text, reference) for reference in references), at)]
        waiting = self.waiting.setdefault(key, {})
        waiting[agent.token_id] = (agent, text, trusted, at)
        agreeing = trusted and any(
            other.user_id != agent.user_id and was_trusted and similar(text, answer)
            for other, answer, was_trusted, _ in waiting.values()
        )
        if not agreeing:
            return []
        self.answers[key] = text
        del self.waiting[key]
        return [(other, similar(answer, text), when) for other, answer, _, when in waiting.values()]

    def prompt_for(self, slug: str, quantization: str, token_id: int, rng: random.Random) -> int:
        """A prompt whose answer can be judged now (half the time, when there is one), else one
        another token answered (trusted ones first) so a reference can form, else a new one."""
        keys = [(slug, quantization, i) for i in range(len(PROMPTS))]
        judged = [k for k in keys if self.references(k)]
        others = [k for k in keys if k not in judged and any(t != token_id for t in self.waiting.get(k, {}))]
        trusted = [k for k in others if any(t != token_id and w[2] for t, w in self.waiting[k].items())]
        fresh = [k for k in keys if k not in judged and token_id not in self.waiting.get(k, {})]
        tiers = (
            [judged, trusted, others, fresh, judged, keys]
            if rng.random() < 0.5
            else [trusted, others, fresh, judged, keys]
        )
        return rng.choice(next(tier for tier in tiers if tier))[2]


@dataclass
class Verifier:
    registry: Registry
    dispatcher: Dispatcher
    book: trust.TrustBook
    clawback: Clawback
    first_chunk_timeout: float
    idle_timeout: float
    references: References = field(default_factory=References)
    done: dict[int, int] = field(default_factory=dict)  # canaries run per agent token
    rng: random.Random = field(default_factory=random.Random)
    _running: set[asyncio.Task[None]] = field(default_factory=set)

    def pick(self) -> tuple[ConnectedAgent, str] | None:
        """The agent to verify next: the one with the fewest canaries, ties at random; and a model."""
        free = [a for a in self.registry.agents() if not a.draining and a.in_flight < a.max_concurrency]
        if not free:
            return None
        self.rng.shuffle(free)
        agent = min(free, key=lambda a: self.done.get(a.token_id, 0))
        return agent, self.rng.choice(sorted(agent.models))

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
        task = asyncio.create_task(self._run_logged(agent, slug, quantization, parameters))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_logged(
        self, agent: ConnectedAgent, slug: str, quantization: str, parameter_count: int | None
    ) -> None:
        try:
            await self.run(agent, slug, quantization, parameter_count)
        except Exception:  # one canary's trouble must not stop the next
            log.exception("verification job failed", extra={"agent_id": agent.agent_id})

    def close(self) -> None:
        for task in list(self._running):
            task.cancel()

    async def run(
        self, agent: ConnectedAgent, slug: str, quantization: str = UNLABELED, parameter_count: int | None = None
    ) -> None:
        """Send one canary to ``agent`` and count what it shows as evidence; ``quantization`` is the
        label whose references judge it (one the directory lists, else unlabeled)."""
        index = self.references.prompt_for(slug, quantization, agent.token_id, self.rng)
        self.done[agent.token_id] = self.done.get(agent.token_id, 0) + 1
        job = await self.dispatcher.assign(
            agent, slug, canary_body(slug, PROMPTS[index]), stream=True, want_usage=False
        )
        payloads: list[bytes] = []
        delivered = 0
        usage: Usage | None = None
        event = await job.next(self.first_chunk_timeout)
        while True:
            if isinstance(event, Chunk):
                payloads.append(event.data)
                delivered += text_deltas(event.data)
            elif isinstance(event, Done):
                payloads.extend(event.tail)
                delivered += sum(text_deltas(chunk) for chunk in event.tail)
                usage = event.usage
                break
            else:
                job.cancel()
                self.dispatcher.witness_failure(agent, job, event, started=bool(payloads), origin=CANARY)
                return
            event = await job.next(self.idle_timeout)
        answered = time.monotonic()
        output = audit.read_output(payloads)
        verdict = audit.judge(
            audit.Job(
                stream=True,
                delivered=delivered,
                reported=usage,
                output=output,
                seconds=time.perf_counter() - job.assigned_at,
                parameter_count=parameter_count,
            )
        )
        for kind, detail in verdict.findings:
            self.book.witness(agent, kind, CANARY + detail, job.job_id)
        trusted = agent.trust >= trust.TRUSTED
        key = (slug, quantization, index)
        for judged, passed, at in self.references.judge(key, agent, output.text, trusted, answered):
            kind = trust.CANARY_PASSED if passed else trust.CANARY_FAILED
            detail = f"{CANARY}{slug} prompt {index}: answer {'matches' if passed else 'differs from'} the reference"
            self.book.witness(judged, kind, detail, job.job_id if judged is agent else None)
            if passed:
                self.clawback.vouched(judged.token_id, judged.agent_id, slug, at)
            else:
                self.clawback.discredited(judged.token_id, slug)
