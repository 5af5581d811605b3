"""Verification without a database: the canary prompt pool, the consumer shapes canaries copy,
when two answers agree, and which passes clear a provider once the operator has prompts of its own.
References kept in the database and the verifier against a scripted agent are in
tests/integration/test_verification.py."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from coordinator.core.settings import SettingsError
from coordinator.market.registry import ConnectedAgent, Registry
from coordinator.money.clawback import Clawback
from coordinator.money.requestlog import RequestRecord
from coordinator.serving.verify import Verifier
from coordinator.trust import canaries
from coordinator.trust import scores as trust
from coordinator.trust.canaries import Prompts, Shapes, build, shape_of
from coordinator.trust.references import PLATFORM, Answer, Comparison, Reference, agrees
from coordinator.trust.scores import TrustBook
from shared.protocol import ModelOffer

PARIS = "Paris is the capital of France. It is known for the Eiffel Tower."


WRONG = "The capital of France is Lyon, a city on the Rhone river in the east."


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


def _agent(token_id: int, user_id: int, link: object = None, label: str = "") -> ConnectedAgent:
    offer = ModelOffer("m", "local", 100, 200, quantization=label)
    return ConnectedAgent(f"agt_{token_id}", user_id, token_id, {"m": offer}, 4, link, time.monotonic())  # type: ignore[arg-type]


def test_with_operator_prompts_only_a_pass_on_one_of_them_clears_strikes_and_vouches() -> None:
    """The shipped prompts are public: a cheater can answer those alone honestly."""
    clawback = Clawback(engine=None, leases=None, confirmations=2)  # type: ignore[arg-type]
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
    verifier._settle(Comparison(agent, False, 0.0, "m", canaries.digest("m", "Secret one?")))
    verifier._settle(Comparison(agent, True, time.monotonic(), "m", canaries.digest("m", "Public?")))
    assert clawback.strikes[(7, "m")] and (7, "m") in clawback.unvouched  # the public pass changes nothing
    verifier._settle(Comparison(agent, False, 0.0, "m", canaries.digest("m", "Secret two?")))
    assert [job.request_id for job in clawback.due] == ["req_1"]  # confirmed: refunded
    verifier._settle(Comparison(agent, True, time.monotonic(), "m", canaries.digest("m", "Secret two?")))
    assert (7, "m") not in clawback.strikes and (7, "m") not in clawback.discredited_now
    assert [e.kind for e in book.pending] == [trust.CANARY_FAILED, trust.CANARY_PASSED] * 2  # evidence each time
