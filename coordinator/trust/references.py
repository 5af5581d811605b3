"""Reference answers to canary prompts, from sources the operator trusts, and the answers that wait.

Only two kinds of source may say what a model answers: the platform upstream (when it serves the
model) and providers the operator vouches for (``pool-coordinator admin vouch``). No number of
ordinary accounts, however trusted their agents' scores, can form or change a reference: a score is
earned by serving, and serving is something a cheater can buy from itself. Each source keeps its own
reference per model, quantisation label and prompt; an answer passes if it agrees with any of those of
its own label, or, when its label has none, of any label. References are rows of
``canary_references`` (kept across restarts, read by every process); answers given before any
reference exists wait here, a bounded number of them, and are judged once one forms.

Embeddings (of a prompt, by an embedding model) are compared by cosine similarity. Texts are
compared on what both cover: greedy decoding with a lower token limit gives a
prefix of the answer with a higher one, so an answer cut by its limit must begin like the reference,
and one the model ended must end where the reference does. An answer cut by its limit holds at least a
byte per token; one far shorter than its limit claims to stop early without saying so, and fails.
"""

from __future__ import annotations

import difflib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple, cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from coordinator.core.models import CanaryReference, User
from coordinator.identity import users
from coordinator.market import vectors
from coordinator.market.registry import ConnectedAgent

log = logging.getLogger(__name__)
_table = cast(Table, CanaryReference.__table__)
_users = cast(Table, User.__table__)

SIMILAR = 0.8  # difflib ratio at which two answers count as the same
# Cosine similarity at which two embeddings of a prompt count as one model's: quantisations of one
# model stay above it, another model (or noise) falls far below.
EMBEDDING_SIMILAR = 0.98
PLATFORM = "platform"  # the source name of the platform upstream
UNLABELED = ""  # no quantisation label (or one the directory does not list)
WAITING = 4096  # answers kept waiting for a reference; the oldest prompts' answers leave first
MIN_CUT_BYTES = 16  # a reference cut by its limit must hold this much to judge anything


class Answer(NamedTuple):
    """What an agent (or a source) answered: the text, whether the model ended it (``finish_reason``
    ``stop``) rather than a token limit, and the limit it was asked for."""

    text: str
    complete: bool
    limit: int


class Reference(NamedTuple):
    quantization: str
    source: str
    text: str
    complete: bool


class Waiting(NamedTuple):
    agent: ConnectedAgent
    quantization: str
    answer: Answer
    at: float  # when it answered: time.monotonic()


class Comparison(NamedTuple):
    """An agent's canary answer compared with the references for its prompt."""

    agent: ConnectedAgent
    passed: bool
    at: float  # when it answered: time.monotonic()
    slug: str
    prompt: str  # its digest


Key = tuple[str, str]  # (model slug, prompt digest)


def similar(a: str, b: str) -> bool:
    return difflib.SequenceMatcher(None, a, b).ratio() >= SIMILAR


def agrees(answer: Answer, reference: Reference) -> bool:
    """Whether ``answer`` is what the reference's model says, over what both texts cover; an
    embedding (:func:`coordinator.market.vectors.as_text`) by its cosine similarity."""
    mine, theirs = vectors.from_text(answer.text), vectors.from_text(reference.text)
    if mine is not None or theirs is not None:
        return mine is not None and theirs is not None and vectors.cosine(mine, theirs) >= EMBEDDING_SIMILAR
    a, r = answer.text.strip(), reference.text.strip()
    if not answer.complete and len(answer.text.encode()) < answer.limit // 2:
        return False  # cut by a limit it cannot have reached
    if answer.complete:
        return similar(a, r) if reference.complete else similar(a[: len(r)], r)
    covered = len(a) if reference.complete else min(len(a), len(r))
    return similar(a[:covered], r[:covered]) if covered else False


def better(new: Answer, old: Reference | None) -> bool:
    """Whether ``new`` should replace a source's reference ``old``: ended by the model, or longer."""
    if not new.text.strip() or (not new.complete and len(new.text.encode()) < MIN_CUT_BYTES):
        return False
    if old is None:
        return True
    return not old.complete and (new.complete or len(new.text) > len(old.text))


@dataclass
class ReferenceBook:
    """The references of every source (cached from the table) and the answers waiting for one."""

    engine: AsyncEngine
    answers: dict[Key, list[Reference]] = field(default_factory=dict)
    vouched: set[int] = field(default_factory=set)  # provider user ids the operator vouches for
    waiting: OrderedDict[Key, dict[int, Waiting]] = field(default_factory=OrderedDict)
    waiting_count: int = 0

    def source_of(self, agent: ConnectedAgent) -> str | None:
        """The source an agent's answers are references of, if its provider is vouched for."""
        return f"user:{agent.user_id}" if agent.user_id in self.vouched else None

    def references(self, slug: str, quantization: str, prompt: str, other_than: str | None = None) -> list[Reference]:
        """The references that judge an answer of ``quantization``: its own label's, else any (those
        of sources ``other_than`` one, for a source's own answer)."""
        every = [r for r in self.answers.get((slug, prompt), []) if r.source != other_than]
        return [r for r in every if r.quantization == quantization] or every

    def has(self, slug: str, prompt: str, other_than: str | None = None) -> bool:
        return any(r.source != other_than for r in self.answers.get((slug, prompt), []))

    def waiting_for(self, slug: str) -> list[str]:
        """Prompts (digests) of ``slug`` whose answers wait for a reference."""
        return [prompt for (model, prompt) in self.waiting if model == slug]

    def judge(
        self, slug: str, quantization: str, prompt: str, agent: ConnectedAgent, answer: Answer, at: float
    ) -> list[Comparison]:
        """The verdict on ``answer``, or none while no reference exists (it waits)."""
        references = self.references(slug, quantization, prompt)
        if references:
            return [Comparison(agent, any(agrees(answer, r) for r in references), at, slug, prompt)]
        key = (slug, prompt)
        entries = self.waiting.setdefault(key, {})
        self.waiting_count += agent.token_id not in entries
        entries[agent.token_id] = Waiting(agent, quantization, answer, at)
        while self.waiting_count > WAITING:
            _, dropped = self.waiting.popitem(last=False)
            self.waiting_count -= len(dropped)
        return []

    def _settle(self, key: Key) -> list[Comparison]:
        """Judge the answers waiting on ``key``, which has references now."""
        entries = self.waiting.pop(key, None)
        if not entries:
            return []
        self.waiting_count -= len(entries)
        verdicts: list[Comparison] = []
        for agent, quantization, answer, at in entries.values():
            references = self.references(key[0], quantization, key[1])
            verdicts.append(Comparison(agent, any(agrees(answer, r) for r in references), at, *key))
        return verdicts

    async def contribute(
        self, slug: str, quantization: str, prompt: str, source: str, user_id: int | None, answer: Answer
    ) -> list[Comparison]:
        """Store a trusted source's answer as its reference (when it is one worth keeping) and judge
        the answers that waited for it."""
        key = (slug, prompt)
        mine = [r for r in self.answers.get(key, []) if r.source == source and r.quantization == quantization]
        if not better(answer, mine[0] if mine else None):
            return []
        reference = Reference(quantization, source, answer.text, answer.complete)
        others = [r for r in self.answers.get(key, []) if r not in mine]
        if others and not any(agrees(answer, r) for r in others):
            log.warning("a trusted source disagrees with another", extra={"model": slug, "source": source})
        await save(self.engine, slug, prompt, reference, user_id)
        self.answers[key] = [*others, reference]
        return self._settle(key)

    async def refresh(self) -> list[Comparison]:
        """Read the vouched providers and every reference again (other processes add some, an
        unvouched provider's go); judge the answers that have references now."""
        async with self.engine.connect() as conn:
            self.vouched = set(
                (await conn.execute(select(_users.c.id).where(_users.c.vouched_at.is_not(None)))).scalars()
            )
            rows = (await conn.execute(select(_table))).all()
        answers: dict[Key, list[Reference]] = {}
        for row in rows:
            answers.setdefault((row.model, row.prompt), []).append(
                Reference(row.quantization, row.source, row.text, row.complete)
            )
        self.answers = answers
        return [verdict for key in [k for k in self.waiting if k in answers] for verdict in self._settle(key)]


async def save(engine: AsyncEngine, slug: str, prompt: str, reference: Reference, user_id: int | None) -> None:
    """Write (or replace) one source's reference."""
    key = (
        (_table.c.model == slug)
        & (_table.c.quantization == reference.quantization)
        & (_table.c.prompt == prompt)
        & (_table.c.source == reference.source)
    )
    row = {
        "model": slug,
        "quantization": reference.quantization,
        "prompt": prompt,
        "source": reference.source,
        "user_id": user_id,
        "text": reference.text,
        "complete": reference.complete,
        "created_at": datetime.now(UTC),
    }
    try:
        async with engine.begin() as conn:
            await conn.execute(delete(_table).where(key))
            await conn.execute(insert(_table), [row])
    except IntegrityError:  # another process stored one at the same moment: theirs stands
        log.info("reference stored by another process", extra={"model": slug, "source": reference.source})


async def vouch(session: AsyncSession, email: str, vouched: bool) -> str:
    """Vouch for a provider (its agents' canary answers become references), or stop: its references go."""
    user = await users.user_by_email(session, email)
    await session.execute(
        update(User).where(User.id == user.id).values(vouched_at=datetime.now(UTC) if vouched else None)
    )
    if vouched:
        return f"vouched for {user.email}: its agents' canary answers are references"
    removed = await session.execute(delete(CanaryReference).where(CanaryReference.user_id == user.id))
    count = removed.rowcount  # type: ignore[attr-defined]
    return f"no longer vouching for {user.email}: {count} reference answers removed"
