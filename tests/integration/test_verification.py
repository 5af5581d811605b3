"""Verification with a database: references only from trusted sources (kept in the database, read
by every process), each quantization's own references first, and the verifier running real canaries
(stream, cut stream, whole reply) against a scripted agent link. The parts without a database are in
tests/unit/test_verification.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import text

from coordinator.core import db
from coordinator.identity import users
from coordinator.market import vectors
from coordinator.market.registry import ConnectedAgent, Registry
from coordinator.market.upstream import Upstream
from coordinator.money.clawback import Clawback
from coordinator.serving.dispatch import Dispatcher
from coordinator.serving.verify import CANARY, Verifier
from coordinator.trust import canaries, references
from coordinator.trust import scores as trust
from coordinator.trust.canaries import Prompts, Shapes
from coordinator.trust.references import PLATFORM, Answer, Reference, ReferenceBook
from coordinator.trust.scores import TrustBook
from shared.protocol import COMPLETION, EMBEDDING, JobAssign, JobChunk, JobDone, Message, ModelOffer, Usage
from tests.standin import vector

PARIS = "Paris is the capital of France. It is known for the Eiffel Tower."
WRONG = "The capital of France is Lyon, a city on the Rhone river in the east."


def _body(**fields: Any) -> bytes:
    return msgspec.json.encode(fields)


# --- references from trusted sources only ---------------------------------------------------------


def _agent(token_id: int, user_id: int, link: object = None, label: str = "") -> ConnectedAgent:
    offer = ModelOffer("m", "local", 100, 200, quantization=label)
    return ConnectedAgent(f"agt_{token_id}", user_id, token_id, {"m": offer}, 4, link, time.monotonic())  # type: ignore[arg-type]


async def _users(engine: Any, *emails: str) -> list[int]:
    async with db.sessionmaker(engine)() as session, session.begin():
        return [(await users.create_user(session, email)).id for email in emails]


async def _vouch(engine: Any, email: str, vouched: bool = True) -> str:
    async with db.sessionmaker(engine)() as session, session.begin():
        return await references.vouch(session, email, vouched)


async def test_ordinary_accounts_never_form_a_reference_and_trusted_sources_do(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        honest, *sybils = await _users(engine, "honest@p.example", *(f"sybil{i}@p.example" for i in range(5)))
        book = ReferenceBook(engine)
        await book.refresh()
        prompt = canaries.digest("m", "What is the capital of France?")
        # any number of ordinary accounts agreeing, trusted or not, only wait
        for n, user in enumerate(sybils):
            agent = _agent(10 + n, user)
            agent.trust = 95.0
            assert book.source_of(agent) is None
            assert book.judge("m", "", prompt, agent, Answer(WRONG, True, 64), float(n)) == []
        assert not book.has("m", prompt) and book.waiting_count == 5
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM canary_references"))).scalar_one() == 0

        # the operator vouches for a provider: its answer is a reference and settles the waiting ones
        assert "vouched" in await _vouch(engine, "honest@p.example")
        await book.refresh()
        source = book.source_of(_agent(1, honest))
        assert source == f"user:{honest}"
        verdicts = await book.contribute("m", "", prompt, source, honest, Answer(PARIS, True, 64))
        assert sorted((v.agent.token_id, v.passed) for v in verdicts) == [(10 + n, False) for n in range(5)]
        assert book.waiting_count == 0
        assert book.judge("m", "", prompt, _agent(20, sybils[0]), Answer(PARIS, True, 64), 0.0)[0].passed
        # the platform upstream is a source too: an answer agreeing with either passes
        other = canaries.digest("m", "Name three colours.")
        await book.contribute("m", "", other, PLATFORM, None, Answer("Red, blue and green.", True, 64))

        # kept in the database: another process (a new book) reads them
        fresh = ReferenceBook(engine)
        await fresh.refresh()
        assert fresh.references("m", "q8_0", prompt) == [Reference("", source, PARIS, True)]
        assert fresh.references("m", "", other) == [Reference("", PLATFORM, "Red, blue and green.", True)]
        # a shorter or cut answer does not replace a whole one
        assert await fresh.contribute("m", "", prompt, source, honest, Answer(PARIS[:20], False, 5)) == []
        # unvouched: its references go, everywhere
        assert "1 reference answers removed" in await _vouch(engine, "honest@p.example", False)
        await fresh.refresh()
        assert not fresh.has("m", prompt) and fresh.has("m", other) and fresh.vouched == set()
    finally:
        await engine.dispose()


async def test_own_label_references_first_and_waiting_answers_are_bounded(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.migrate(engine)
        (user,) = await _users(engine, "v@p.example")
        book = ReferenceBook(engine)
        prompt = canaries.digest("m", "Say hello in Spanish.")
        await book.contribute("m", "q8_0", prompt, f"user:{user}", user, Answer("Hola!", True, 64))
        assert book.judge("m", "q4_k_m", prompt, _agent(2, 9), Answer("Hola!", True, 64), 0)[0].passed  # any label
        await book.contribute("m", "q4_k_m", prompt, PLATFORM, None, Answer("¡Hola, amigo!", True, 64))
        assert not book.judge("m", "q4_k_m", prompt, _agent(2, 9), Answer("Hola!", True, 64), 0)[0].passed  # own
        assert book.judge("m", "", prompt, _agent(3, 9), Answer("Hola!", True, 64), 0)[0].passed  # any

        monkeypatch.setattr(references, "WAITING", 10)
        for n in range(30):
            book.judge("m", "", canaries.digest("m", f"prompt {n}"), _agent(n, 9), Answer("x", True, 8), 0)
        assert book.waiting_count == 10 and len(book.waiting) == 10
        assert canaries.digest("m", "prompt 29") in book.waiting_for("m")  # the newest stay
    finally:
        await engine.dispose()


# --- the verifier against a scripted agent --------------------------------------------------------


class ScriptedLink:
    """An agent's socket: answers each job as a backend would, streamed (one word per chunk) or whole."""

    def __init__(self, dispatcher: Dispatcher, answer: str) -> None:
        self.dispatcher = dispatcher
        self.answer = answer
        self.assigned: list[JobAssign] = []
        self.cancelled = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, message: Message) -> None:
        if isinstance(message, JobAssign):
            self.assigned.append(message)
            task = asyncio.create_task(self._serve(message))
            self._tasks.add(task)
        else:
            self.cancelled += 1

    @property
    def agent(self) -> ConnectedAgent:
        """The agent this socket belongs to (it speaks only for its own jobs)."""
        for agent in self.dispatcher.registry.agents():
            if agent.link is self:
                return agent
        raise AssertionError("no agent on this link")

    async def _serve(self, job: JobAssign) -> None:
        await asyncio.sleep(0.05)  # pacing: a backend's time to its first token
        body = msgspec.json.decode(job.request)
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or 10_000
        words = [f"{word} " for word in self.answer.split()][:limit]
        finish = "stop" if len(words) == len(self.answer.split()) else "length"
        text = job.kind == COMPLETION  # a text completion: ``choices[].text``
        if not job.stream:
            message = {"role": "assistant", "content": "".join(words)}
            answer = {"text": "".join(words)} if text else {"message": message}
            whole = {"choices": [{"index": 0, **answer, "finish_reason": finish}]}
            done = JobDone(job_id=job.job_id, finish_reason=finish, tail=[msgspec.json.encode(whole)])
            self.dispatcher.on_done(self.agent, done)
            return
        for seq, word in enumerate(words):
            piece = {"text": word} if text else {"delta": {"content": word}}
            chunk = {"choices": [{"index": 0, **piece, "finish_reason": None}]}
            await self.dispatcher.on_chunk(
                self.agent, JobChunk(job_id=job.job_id, seq=seq, data=msgspec.json.encode(chunk))
            )
            await asyncio.sleep(0.001)  # a speed the audit believes
        last = msgspec.json.encode({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        self.dispatcher.on_done(self.agent, JobDone(job_id=job.job_id, finish_reason=finish, tail=[last]))

    async def close(self, code: int, reason: str) -> None:
        return None


async def test_the_verifier_judges_stream_cut_and_whole_canaries(tmp_path: Path) -> None:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
    try:
        await db.migrate(engine)
        vouched, ordinary, other = await _users(engine, "v@p.example", "o@p.example", "w@p.example")
        await _vouch(engine, "v@p.example")
        await _vouch(engine, "w@p.example")
        registry = Registry()
        dispatcher = Dispatcher(registry, Upstream(None, None, {}, 5.0), 5.0, 60.0)
        book = TrustBook(engine, 3600.0, 2)
        clawback = Clawback(engine, None, confirmations=2)  # type: ignore[arg-type]
        verifier = Verifier(
            registry, dispatcher, book, clawback, 5.0, 5.0, ReferenceBook(engine), prompts=Prompts(shipped=("Q?",))
        )
        await verifier.refresh()
        long_answer = " ".join(f"w{i}" for i in range(100))  # longer than the cap: every canary is cut
        source = _agent(1, vouched, ScriptedLink(dispatcher, long_answer))
        honest = _agent(2, ordinary, ScriptedLink(dispatcher, long_answer))
        cheat = _agent(3, ordinary + 100, ScriptedLink(dispatcher, "x " * 100))
        wrong_source = _agent(4, other, ScriptedLink(dispatcher, "y " * 100))  # vouched, but wrong
        for agent in (source, honest, cheat, wrong_source):
            registry.add(agent)
            book.reputations[agent.token_id] = trust.Reputation()
        shapes = [
            _body(messages=[], model="m", stream=True),  # no limit: read up to the cap, then cancelled
            _body(messages=[], model="m", max_tokens=20),  # a whole reply
            _body(messages=[], model="m", stream=True, stream_options={"include_usage": True}, max_tokens=30),
        ]
        verifier.shapes = Shapes(every=1)
        # Shapes are drawn at random (the honest agent missed the unlimited stream about 1 run in 17):
        # a seed with which it gets one.
        verifier.rng = random.Random(1)
        for raw in shapes:
            verifier.shapes.observe(raw)
        await verifier.run(honest, "m")  # no reference yet: waits
        assert book.pending == [] and verifier.references.waiting_count == 1
        await verifier.run(source, "m")  # the vouched provider's answer forms it, and judges the waiting one
        kinds = [(e.token_id, e.kind) for e in book.pending]
        assert kinds == [(2, trust.CANARY_PASSED)] and all(e.detail.startswith(CANARY) for e in book.pending)
        assert all(e.job_id is None and "Q?" not in e.detail for e in book.pending)  # names no job, no prompt
        # another vouched source is judged by the first one's reference, and its wrong answer is not added
        await verifier.run(wrong_source, "m")
        assert [(e.token_id, e.kind) for e in book.pending][-1] == (4, trust.CANARY_FAILED)
        assert [r.source for r in verifier.references.answers[("m", canaries.digest("m", "Q?"))]] == [f"user:{vouched}"]
        for _ in range(6):
            await verifier.run(honest, "m")
            await verifier.run(cheat, "m")
        verdicts = [(e.token_id, e.kind) for e in book.pending if e.kind.startswith("canary")]
        assert verdicts.count((2, trust.CANARY_PASSED)) == 7 and verdicts.count((3, trust.CANARY_FAILED)) == 6
        assigned = source.link.assigned + honest.link.assigned + cheat.link.assigned  # type: ignore[attr-defined]
        assert {job.stream for job in assigned} == {True, False} and any(job.want_usage for job in assigned)
        assert honest.link.cancelled > 0  # type: ignore[attr-defined]  # a stream without a limit was cut
        # one prompt in the pool: the failures never confirm (distinct prompts needed)
        assert clawback.strikes[(3, "m")] == {canaries.digest("m", "Q?")} and (3, "m") not in clawback.discredited_now
    finally:
        await engine.dispose()


@dataclass
class World:
    """A verifier over a database with one vouched provider and one ordinary one; agents join with
    :meth:`join`."""

    engine: Any
    vouched: int
    ordinary: int
    dispatcher: Dispatcher
    book: TrustBook
    clawback: Clawback
    verifier: Verifier

    def join(self, token_id: int, user_id: int, offer: ModelOffer, link: ScriptedLink) -> ConnectedAgent:
        agent = ConnectedAgent(f"agt_{token_id}", user_id, token_id, {offer.slug: offer}, 4, link, time.monotonic())  # type: ignore[arg-type]
        self.dispatcher.registry.add(agent)
        self.book.reputations[token_id] = trust.Reputation()
        return agent


@contextlib.asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
    try:
        await db.migrate(engine)
        vouched, ordinary = await _users(engine, "v@p.example", "o@p.example")
        await _vouch(engine, "v@p.example")
        dispatcher = Dispatcher(Registry(), Upstream(None, None, {}, 5.0), 5.0, 60.0)
        book = TrustBook(engine, 3600.0, 2)
        clawback = Clawback(engine, None, confirmations=2)  # type: ignore[arg-type]
        verifier = Verifier(
            dispatcher.registry,
            dispatcher,
            book,
            clawback,
            5.0,
            5.0,
            ReferenceBook(engine),
            prompts=Prompts(shipped=("Q?",)),
        )
        await verifier.refresh()
        yield World(engine, vouched, ordinary, dispatcher, book, clawback, verifier)
    finally:
        await engine.dispose()


class EmbeddingLink(ScriptedLink):
    """An embedding agent's socket: answers each job with the stand-in backend's vector of its input,
    or of the input salted (a different model passing as this one), or with no vector at all."""

    def __init__(self, dispatcher: Dispatcher, salt: str = "", broken: bool = False) -> None:
        super().__init__(dispatcher, "")
        self.salt, self.broken = salt, broken

    async def _serve(self, job: JobAssign) -> None:
        body = msgspec.json.decode(job.request)
        data = (
            []
            if self.broken
            else [{"object": "embedding", "index": 0, "embedding": vector(self.salt + body["input"], 8)}]
        )
        reply = {"object": "list", "data": data, "usage": {"prompt_tokens": 2, "total_tokens": 2}}
        done = JobDone(job_id=job.job_id, usage=Usage(2, 0, 2), tail=[msgspec.json.encode(reply)])
        self.dispatcher.on_done(self.agent, done)


async def test_embedding_canaries_are_judged_by_cosine_similarity(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        book, verifier = w.book, w.verifier

        def embedder(token_id: int, user_id: int, link: EmbeddingLink) -> ConnectedAgent:
            return w.join(token_id, user_id, ModelOffer("e", "local", 100, 0, kinds=[EMBEDDING]), link)

        source = embedder(1, w.vouched, EmbeddingLink(w.dispatcher))
        honest = embedder(2, w.ordinary, EmbeddingLink(w.dispatcher))
        other_model = embedder(3, w.ordinary + 100, EmbeddingLink(w.dispatcher, salt="another model: "))
        broken = embedder(4, w.ordinary + 101, EmbeddingLink(w.dispatcher, broken=True))
        assert verifier.pick() is not None and verifier.pick()[1] == "e"  # type: ignore[index]
        await verifier.run(source, "e")  # the vouched provider's vector is the reference
        (reference,) = verifier.references.answers[("e", canaries.digest("e", "Q?"))]
        assert vectors.from_text(reference.text) == pytest.approx(vector("Q?", 8), abs=1e-6)
        for agent in (honest, other_model, broken):
            await verifier.run(agent, "e")
        verdicts = [(e.token_id, e.kind) for e in book.pending]
        assert (2, trust.CANARY_PASSED) in verdicts and (3, trust.CANARY_FAILED) in verdicts
        assert (4, trust.BAD_OUTPUT) in verdicts and not any(
            token == 4 and kind.startswith("canary") for token, kind in verdicts
        )
        jobs = [job for agent in (source, honest, other_model) for job in agent.link.assigned]  # type: ignore[attr-defined]
        assert {job.kind for job in jobs} == {EMBEDDING}  # never a chat canary to an embedding model
        assert msgspec.json.decode(jobs[0].request) == {"model": "e", "input": "Q?", "encoding_format": "float"}


async def test_completion_canaries_have_references_of_their_own(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        book, verifier, clawback = w.book, w.verifier, w.clawback
        vouched, ordinary = w.vouched, w.ordinary

        def completer(token_id: int, user_id: int, answer: str) -> ConnectedAgent:
            offer = ModelOffer("m", "local", 100, 200, kinds=[COMPLETION])  # a base model's server: no chat
            return w.join(token_id, user_id, offer, ScriptedLink(w.dispatcher, answer))

        source, honest, cheat = completer(1, vouched, PARIS), completer(2, ordinary, PARIS), completer(3, 99, WRONG)
        assert verifier.pick() is not None  # a completion-only offer is verified too
        await verifier.run(source, "m")
        for agent in (honest, cheat):
            await verifier.run(agent, "m")
        verdicts = [(e.token_id, e.kind) for e in book.pending]
        assert (2, trust.CANARY_PASSED) in verdicts and (3, trust.CANARY_FAILED) in verdicts
        assert all(e.detail.startswith(f"{CANARY}m:") for e in book.pending)  # evidence names the model, not the key
        assert set(verifier.references.answers) == {("m#completion", canaries.digest("m#completion", "Q?"))}
        jobs = [job for agent in (source, honest, cheat) for job in agent.link.assigned]  # type: ignore[attr-defined]
        assert {job.kind for job in jobs} == {COMPLETION}
        assert all("prompt" in msgspec.json.decode(job.request) for job in jobs)
        assert clawback.strikes[(3, "m")] == {canaries.digest("m#completion", "Q?")}  # strikes against the model
