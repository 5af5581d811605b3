"""Job kinds without sockets: what an agent's hello is taken for, that placement gives a job only
to an agent whose offer serves its kind (from the index and by a scan), what an older agent sees,
what a backend gets for a completion or an embedding, and how an embedding reply is checked and
shaped. The same through real processes: tests/integration/test_kinds.py and tests/e2e/test_apis.py."""

from __future__ import annotations

import base64
import itertools
import math
import random
import struct

import msgspec
import pytest

from coordinator.market import catalog, placement, vectors
from coordinator.market.forward import backend_body, content_problem, kind_of
from coordinator.market.offers import HelloRefused, hello_offers
from coordinator.market.placement import Routing
from coordinator.market.registry import ConnectedAgent, Registry
from coordinator.market.upstream import Upstream
from coordinator.money.metering import Price, output_bound, prompt_estimate
from shared import protocol
from shared.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, has_token_ids
from shared.protocol import CHAT, COMPLETION, EMBEDDING, Hello, JobAssign, ModelOffer

DIRECTORY = catalog.Directory(catalog.shipped())
CEILING = Price(50_000, 200_000)
_tokens = itertools.count(1)


class _Link:
    async def send(self, message: object) -> None:
        raise AssertionError("placement must not talk to agents")

    async def close(self, code: int, reason: str) -> None:
        raise AssertionError("placement must not talk to agents")


def _hello(kinds: list[str], slug: str = "smollm2-135m", version: int = protocol.PROTOCOL_VERSION) -> Hello:
    offer = ModelOffer(slug, "backend-name", 1, 2, kinds=kinds)
    return Hello(protocol=version, agent_version="t", models=[offer], max_concurrency=2)


def test_a_hello_is_taken_for_the_kinds_the_directory_allows_its_models() -> None:
    assert hello_offers(_hello([]), DIRECTORY, CEILING)["smollm2-135m"].kinds == []  # chat, as before kinds
    assert hello_offers(_hello([CHAT]), DIRECTORY, CEILING)["smollm2-135m"].kinds == []
    both = hello_offers(_hello([COMPLETION, CHAT, EMBEDDING]), DIRECTORY, CEILING)["smollm2-135m"]
    assert both.kinds == [CHAT, COMPLETION]  # a chat model is not embedded with, whatever the backend can
    assert both.serves(COMPLETION) and not both.serves(EMBEDDING)
    embed = hello_offers(_hello([CHAT, EMBEDDING], "smollm2-135m-embed"), DIRECTORY, CEILING)["smollm2-135m-embed"]
    assert embed.kinds == [EMBEDDING] and not embed.serves(CHAT)
    assert hello_offers(_hello([CHAT, "image"]), DIRECTORY, CEILING)["smollm2-135m"].kinds == []  # unknown: ignored
    with pytest.raises(HelloRefused, match="directory lists it as an embedding model"):
        hello_offers(_hello([CHAT, COMPLETION], "smollm2-135m-embed"), DIRECTORY, CEILING)
    with pytest.raises(HelloRefused, match="for chat and completions"):
        hello_offers(_hello([EMBEDDING]), DIRECTORY, CEILING)
    with pytest.raises(HelloRefused):
        hello_offers(_hello(["image"]), DIRECTORY, CEILING)


def test_an_agent_of_the_previous_protocol_serves_chat() -> None:
    old = hello_offers(_hello([COMPLETION, EMBEDDING], version=1), DIRECTORY, CEILING)["smollm2-135m"]
    assert old.kinds == [] and old.serves(CHAT) and not old.serves(COMPLETION)
    with pytest.raises(HelloRefused, match="embedding model"):
        hello_offers(_hello([], "smollm2-135m-embed", version=1), DIRECTORY, CEILING)
    with pytest.raises(HelloRefused, match="protocol version 0"):
        hello_offers(_hello([], version=0), DIRECTORY, CEILING)
    # A chat job reads exactly as it did before kinds: the default is left out on the wire.
    assign = JobAssign("j", "m", "b", b"{}", stream=False, want_usage=False, deadline=1.0)
    assert b"kind" not in protocol.encode(assign)
    assert b"kind" in protocol.encode(msgspec.structs.replace(assign, kind=EMBEDDING))


def _agent(agent_id: str, kinds: list[str], slug: str = "m", price: int = 100) -> ConnectedAgent:
    offer = ModelOffer(slug, slug, price, price, kinds=kinds)
    return ConnectedAgent(agent_id, 1, next(_tokens), {slug: offer}, 4, _Link(), 0.0)


@pytest.mark.parametrize("scan", [False, True])
def test_placement_gives_a_job_only_to_an_agent_that_serves_its_kind(scan: bool) -> None:
    registry = Registry()
    for agent in (
        _agent("chat-only", []),
        _agent("completes", [CHAT, COMPLETION], price=300),
        _agent("embeds", [EMBEDDING], price=1),  # the cheapest, for nothing but embeddings
    ):
        registry.add(agent)
    rng = random.Random(7)

    def chosen(kind: str, **routing: object) -> set[str]:
        found = set()
        for _ in range(50):
            choice = placement.choose(registry, "m", Routing(kind=kind, **routing), rng=rng, scan=scan)  # type: ignore[arg-type]
            found.add(choice.agent.agent_id if choice else "none")
        return found

    assert chosen(CHAT) == {"chat-only"}  # the cheaper of the two chat agents
    assert chosen(CHAT, sort="price") == {"chat-only"}  # the embedding agent is cheaper still, and not a chat agent
    assert chosen(CHAT, only=frozenset({"completes", "embeds"})) == {"completes"}
    assert chosen(COMPLETION) == {"completes"}
    assert chosen(EMBEDDING) == {"embeds"}
    assert chosen(EMBEDDING, only=frozenset({"chat-only"})) == {"none"}
    upstream = Upstream(None, None, {}, 5.0)
    assert placement.prices(registry, upstream, ["m"], Routing(kind=COMPLETION), trust_floor=0).ceiling == Price(
        300, 300
    )


def test_the_upstream_serves_the_kinds_the_operator_names() -> None:
    upstream = Upstream("http://127.0.0.1:9/v1", None, {"m": "m", "e": "e"}, 1.0, kinds={"e": frozenset({EMBEDDING})})
    assert upstream.serves("m") and upstream.serves("m", CHAT) and not upstream.serves("m", EMBEDDING)
    assert upstream.serves("e", EMBEDDING) and not upstream.serves("e", CHAT)


def test_what_a_backend_gets_for_each_kind() -> None:
    raw = b'{"model":"m","prompt":["a","b"],"echo":false,"max_tokens":9,"provider":{"sort":"price"},"n_predict":99}'
    body = msgspec.json.decode(backend_body(raw, 5, COMPLETION))
    assert body == {"model": "m", "prompt": ["a", "b"], "max_tokens": 5}
    raw = b'{"model":"e","input":[[1,2],[3]],"encoding_format":"base64","dimensions":4,"user":"u"}'
    assert msgspec.json.decode(backend_body(raw, 0, EMBEDDING)) == {
        "model": "e",
        "input": [[1, 2], [3]],
        "encoding_format": "float",
    }


def test_prompt_forms_and_bounds() -> None:
    def completion(prompt: object, **kw: object) -> CompletionRequest:
        return msgspec.convert({"model": "m", "prompt": prompt, **kw}, CompletionRequest)

    def embedding(given: object) -> EmbeddingRequest:
        return msgspec.convert({"model": "e", "input": given}, EmbeddingRequest)

    for good in ("text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert content_problem(embedding(good)) is None
    for good in ("text", ["a"], [1, 2, 3], [[1, 2]]):
        assert content_problem(completion(good)) is None
    assert content_problem(embedding(["a", [1]])) == ("input", "`input` mixes strings and token lists: send one form.")
    assert content_problem(embedding(["a", ""]))[0] == "input[1]"  # type: ignore[index]
    assert content_problem(embedding([[1, -2]]))[0] == "input[0]"  # type: ignore[index]
    assert content_problem(embedding([{"text": "a"}]))[0] == "input[0]"  # type: ignore[index]
    assert content_problem(embedding(["x"] * 2049))[0] == "input"  # type: ignore[index]
    assert content_problem(completion("a", echo=True))[0] == "echo"  # type: ignore[index]
    # several prompts would make several choices, each up to the output bound the hold covers once
    assert "One prompt per request" in content_problem(completion(["a", "b"]))[1]  # type: ignore[index]
    assert content_problem(completion([[1, 2], [3]]))[0] == "prompt"  # type: ignore[index]
    assert not has_token_ids(completion("a")) and not has_token_ids(embedding(["a", "b"]))
    assert has_token_ids(completion([1, 2])) and has_token_ids(embedding([[1], [2]]))  # DLP cannot read these
    assert content_problem(completion("a", suffix="b"))[0] == "suffix"  # type: ignore[index]
    assert prompt_estimate(embedding(["abcdefgh", [1, 2, 3]])) == 2 + 3
    assert output_bound(embedding("a"), 4096) == 0
    assert output_bound(completion("a", max_tokens=7), 4096) == 7
    assert output_bound(completion("a"), 4096) == 4096
    assert [kind_of(r) for r in (completion("a"), embedding("a"))] == [COMPLETION, EMBEDDING]
    chat = msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ChatCompletionRequest)
    assert kind_of(chat) == CHAT


def _reply(vectors: list[list[float]], order: list[int] | None = None) -> bytes:
    order = order or list(range(len(vectors)))
    data = [{"object": "embedding", "index": i, "embedding": vectors[i]} for i in order]
    return msgspec.json.encode({"object": "list", "data": data, "usage": {"prompt_tokens": 3, "total_tokens": 3}})


def test_an_embedding_reply_is_checked_before_anyone_pays_for_it() -> None:
    a, b = [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]
    assert vectors.vectors(_reply([a, b], [1, 0]), 2, 3) == [a, b]  # put back in input order
    assert vectors.vectors(_reply([a, b]), 2, None) == [a, b]
    assert vectors.vectors(_reply([a]), 2, 3) == "1 vectors for 2 inputs"
    assert vectors.vectors(_reply([a, [1.0]]), 2, None) == "vectors of different or zero sizes"
    assert vectors.vectors(_reply([a, b]), 2, 4) == "vectors of 3 dimensions, the model's are 4"
    assert "not an embedding list" in str(vectors.vectors(b'{"data": [{"embedding": "AAAA"}]}', 1, None))
    assert "not an embedding list" in str(vectors.vectors(b"[1, 2]", 1, None))
    assert "not finite float32" in str(vectors.vectors(_reply([[1e39, 0.0, 0.0]]), 1, 3))  # base64 could not hold it


def test_an_embedding_is_cut_and_encoded_as_asked() -> None:
    cut = vectors.shortened([3.0, 4.0, 12.0], 2)
    assert cut == [0.6, 0.8] and math.isclose(math.hypot(*cut), 1.0)
    packed = vectors.encoded([0.5, -1.0, 2.0], "base64")
    assert isinstance(packed, str)
    assert list(struct.unpack("<3f", base64.b64decode(packed))) == [0.5, -1.0, 2.0]  # little-endian float32
    assert vectors.encoded([0.5], "float") == [0.5]
    nomic, smol = DIRECTORY.get("nomic-embed-text-v1.5"), DIRECTORY.get("smollm2-135m-embed")
    assert vectors.dimensions_problem(nomic, "nomic-embed-text-v1.5", 256) is None
    assert "at most 768" in str(vectors.dimensions_problem(nomic, "nomic-embed-text-v1.5", 769))
    assert "does not support `dimensions`" in str(vectors.dimensions_problem(smol, "smollm2-135m-embed", 8))
    assert "does not support `dimensions`" in str(vectors.dimensions_problem(None, "unlisted", 8))


def test_a_vector_kept_as_text_comes_back_and_compares_by_cosine() -> None:
    kept = vectors.as_text([0.5, -0.25, 1.0])
    assert kept.startswith(vectors.TEXT_PREFIX) and vectors.from_text(kept) == [0.5, -0.25, 1.0]
    assert vectors.from_text("Paris is the capital") is None
    assert vectors.from_text(vectors.TEXT_PREFIX + "not base64!") is None
    assert math.isclose(vectors.cosine([1.0, 0.0], [2.0, 0.0]), 1.0)
    assert vectors.cosine([1.0, 0.0], [0.0, 1.0]) == 0.0
    assert vectors.cosine([1.0], [1.0, 0.0]) == 0.0  # another model's size: nothing alike
