"""Verification that no ordinary account can game: references only from trusted sources (kept in
the database), confirmation before refunds, the canary prompt pool and the shapes canaries copy, and
the verifier running real canaries (stream, cut stream, whole reply) against a scripted agent link."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import text

from coordinator import accounts, canaries, db, references, trust
from coordinator.canaries import Prompts, Shapes, build, shape_of
from coordinator.clawback import Clawback
from coordinator.dispatch import Dispatcher
from coordinator.references import PLATFORM, Answer, Reference, ReferenceBook, Verdict, agrees
from coordinator.registry import ConnectedAgent, Registry
from coordinator.requestlog import RequestRecord
from coordinator.settings import SettingsError
from coordinator.trust import TrustBook
from coordinator.upstream import Upstream
from coordinator.verify import CANARY, Verifier
from shared.protocol import JobAssign, JobChunk, JobDone, Message, ModelOffer

PARIS = "Paris is the capital of France. It is known for the Eiffel Tower."
WRONG = "The capital of France is Lyon, a city on the Rhone river in the east."

# --- the prompt pool ----------------------------------------------------------------------------


def test_the_shipped_pool_is_large_varied_and_extended_by_the_operators_file(tmp_path: Path) -> None:
    shipped = canaries.shipped()
    assert len(shipped) >= 500 and len(set(shipped)) == len(shipped)
    assert all(len(prompt) < 80 for prompt in shipped)
    assert len({prompt.split()[0] for prompt in shipped}) >= 10  # not one template
    secret = tmp_path / "prompts.txt"
    secret.write_text("# the operator's own\nWhat is the name of our office cat?\n\n  Who won the 1998 cup?  \n")
    pool = Prompts(operator=canaries.read_prompts(str(secret)))
    assert pool.operator == ("What is the name of our office cat?", "Who won the 1998 cup?")
    assert len(pool) == len(shipped) + 2
    rng = random.Random(5)
    drawn = [pool.draw(rng) for _ in range(400)]
    assert 150 < sum(prompt in pool.operator for prompt in drawn) < 250  # half from the operator's
    assert len(set(drawn) & set(shipped)) > 100
    assert canaries.read_prompts(None) == ()
    with pytest.raises(SettingsError, match="POOL_CANARY_PROMPTS_FILE"):
        canaries.read_prompts(str(tmp_path / "missing.txt"))


# --- shapes -------------------------------------------------------------------------------------


def _body(**fields: Any) -> bytes:
    return msgspec.json.encode(fields)


def test_observe_reads_one_request_in_n_into_a_bounded_reservoir() -> None:
    shapes = Shapes(every=4, size=8, rng=random.Random(1))
    for n in range(400):
        # unread requests are not even parsed: garbage costs nothing
        shapes.observe(_body(messages=[], model="m", max_tokens=n + 1) if n % 4 == 0 else b"not json")
    assert shapes.seen == 100 and len(shapes.kept) == 8
    limits = [dict(shape.fields)["max_tokens"] for shape in shapes.kept]
    assert max(limits) > 100  # a uniform sample: later requests replace earlier ones
    assert shapes.draw(random.Random(2)) in shapes.kept
    assert Shapes().draw(random.Random(2)) in canaries.DEFAULT_SHAPES  # nothing seen yet


def test_a_canary_copies_a_consumer_requests_shape_but_stays_deterministic() -> None:
    consumer = (
        b'{"model": "m", "messages": [{"role": "user", "content": "private"}], "stream": true, '
        b'"stream_options": {"include_usage": true}, "user": "u-42", "seed": 1234, "top_p": 1, '
        b'"max_completion_tokens": 500, "temperature": 0.7, "tools": []}'
    )
    shape = shape_of(consumer)
    assert shape is not None and shape.spaced
    assert b"private" not in msgspec.json.encode(shape.fields)  # never the prompt
    canary = build(shape, "smollm2-135m", "What is 2 + 2?")
    body = msgspec.json.decode(canary.body)
    assert list(body) == [
        "model",
        "messages",
        "stream",
        "stream_options",
        "seed",
        "top_p",
        "max_completion_tokens",
        "temperature",
    ]  # the consumer's order; its user id and tools are left out
    assert body["temperature"] == 0 and isinstance(body["temperature"], float)  # greedy, in the consumer's type
    assert body["max_completion_tokens"] == 500 and body["seed"] == 1234  # the stream keeps its limit...
    assert (canary.stream, canary.want_usage, canary.limit, canary.cut) == (True, True, canaries.CAP, True)  # ...cut
    assert canary.body.startswith(b'{"model": "smollm2-135m", "messages": [{"role": "user"')  # spaced like it
    # a whole reply cannot be cut: its limit comes down to the cap; one without a limit gets one
    whole = build(shape_of(_body(messages=[], model="m", max_tokens=900, temperature=0)), "m", "Hi")  # type: ignore[arg-type]
    assert msgspec.json.decode(whole.body)["max_tokens"] == canaries.CAP and not whole.stream and not whole.cut
    bare = build(shape_of(_body(messages=[], model="m", presence_penalty=0.5)), "m", "Hi")  # type: ignore[arg-type]
    assert list(msgspec.json.decode(bare.body).items()) == [
        ("messages", [{"role": "user", "content": "Hi"}]),
        ("model", "m"),
        ("max_tokens", canaries.CAP),  # inserted where a client sorting its keys would put them
        ("presence_penalty", 0.0),  # penalties would change the answer
        ("temperature", 0),
    ]
    short = build(shape_of(_body(messages=[], model="m", stream=True, max_tokens=12)), "m", "Hi")  # type: ignore[arg-type]
    assert (short.limit, short.cut, short.want_usage) == (12, False, False)


# --- agreement ----------------------------------------------------------------------------------


def test_answers_agree_over_what_both_texts_cover() -> None:
    whole = Reference("", PLATFORM, PARIS, complete=True)
    cut = Reference("", PLATFORM, PARIS[:30], complete=False)
    assert agrees(Answer(PARIS, True, 64), whole)
    assert agrees(Answer(PARIS + "!", True, 64), whole)  # near-identical
    assert not agrees(Answer(WRONG, True, 64), whole)
    assert agrees(Answer(PARIS[:40], False, 12), whole)  # a lower limit: a prefix
    assert not agrees(Answer(PARIS[:40], True, 64), whole)  # ended where the model goes on
    assert agrees(Answer(PARIS, True, 64), cut)  # the reference was cut: the answer begins with it
    assert agrees(Answer(PARIS[:50], False, 20), cut)
    assert not agrees(Answer(WRONG, False, 20), cut)
    assert not agrees(Answer("Paris", False, 64), whole)  # "cut by its limit" after 5 bytes of 64 tokens
    assert not agrees(Answer("", False, 2), whole)


# --- references from trusted sources only ---------------------------------------------------------


def _agent(token_id: int, user_id: int, link: object = None, label: str = "") -> ConnectedAgent:
    offer = ModelOffer("m", "local", 100, 200, quantization=label)
    return ConnectedAgent(f"agt_{token_id}", user_id, token_id, {"m": offer}, 4, link, time.monotonic())  # type: ignore[arg-type]


async def _users(engine: Any, *emails: str) -> list[int]:
    async with db.sessionmaker(engine)() as session, session.begin():
        return [(await accounts.create_user(session, email)).id for email in emails]


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


# --- confirmation before refunds ------------------------------------------------------------------


def test_a_disagreement_refunds_only_once_confirmed_on_distinct_prompts() -> None:
    clawback = Clawback(engine=None, accounting=None, confirmations=2)  # type: ignore[arg-type]

    def serve(n: int) -> None:
        record = RequestRecord(id=f"req_{n}", user_id=1, key_id=None, provider_user_id=2, cost=100, provider_earned=90)
        clawback.served(7, "agt_a", "m", record)

    serve(1)
    assert not clawback.disagreed(7, "m", "p1") and clawback.due == []  # one odd answer: a strike
    assert not clawback.disagreed(7, "m", "p1") and clawback.due == []  # the same prompt again: still one
    clawback.vouched(7, "agt_b", "m", answered_at=0.0)  # a pass in between clears the strikes
    assert not clawback.disagreed(7, "m", "p2")
    serve(2)
    assert clawback.disagreed(7, "m", "p3")  # two distinct prompts without a pass: confirmed
    assert [job.request_id for job in clawback.due] == ["req_1", "req_2"]
    serve(3)  # and what ends after it, until a pass
    assert [job.request_id for job in clawback.due] == ["req_1", "req_2", "req_3"]


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
        await asyncio.sleep(0.05)
        body = msgspec.json.decode(job.request)
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or 10_000
        words = [f"{word} " for word in self.answer.split()][:limit]
        finish = "stop" if len(words) == len(self.answer.split()) else "length"
        if not job.stream:
            message = {"role": "assistant", "content": "".join(words)}
            whole = {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
            done = JobDone(job_id=job.job_id, finish_reason=finish, tail=[msgspec.json.encode(whole)])
            self.dispatcher.on_done(self.agent, done)
            return
        for seq, word in enumerate(words):
            chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
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


def test_with_operator_prompts_only_a_pass_on_one_of_them_clears_strikes_and_vouches() -> None:
    """The shipped prompts are public: a cheater can answer those alone honestly."""
    clawback = Clawback(engine=None, accounting=None, confirmations=2)  # type: ignore[arg-type]
    book = TrustBook(None, 3600.0, 2)  # type: ignore[arg-type]
    verifier = Verifier(
        Registry(),
        None,  # type: ignore[arg-type]
        book,
        clawback,
        5.0,
        5.0,
        None,  # type: ignore[arg-type]
        prompts=Prompts(shipped=("Public?",), operator=("Secret one?", "Secret two?")),
    )
    agent = _agent(7, 70)
    record = RequestRecord(id="req_1", user_id=1, key_id=None, provider_user_id=70, cost=100, provider_earned=90)
    clawback.served(7, agent.agent_id, "m", record)
    verifier._settle(Verdict(agent, False, 0.0, "m", canaries.digest("m", "Secret one?")))
    verifier._settle(Verdict(agent, True, time.monotonic(), "m", canaries.digest("m", "Public?")))
    assert clawback.strikes[(7, "m")] and (7, "m") in clawback.unvouched  # the public pass changes nothing
    verifier._settle(Verdict(agent, False, 0.0, "m", canaries.digest("m", "Secret two?")))
    assert [job.request_id for job in clawback.due] == ["req_1"]  # confirmed: refunded
    verifier._settle(Verdict(agent, True, time.monotonic(), "m", canaries.digest("m", "Secret two?")))
    assert (7, "m") not in clawback.strikes and (7, "m") not in clawback.discredited_now
    assert [e.kind for e in book.pending] == [trust.CANARY_FAILED, trust.CANARY_PASSED] * 2  # evidence each time
