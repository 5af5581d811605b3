"""One embeddings request (``POST /v1/embeddings``): admitted, held, placed and billed as a chat
request is (:mod:`coordinator.services.inference`), as a job of kind ``embedding``.

What comes back is checked before anyone pays for it: one vector per input, all of one size (the
directory's, when it names one), finite numbers. The coordinator, not the agent, then shapes the
reply: vectors cut to the request's ``dimensions`` (for models the directory calls matryoshka) and
renormalised, encoded as floats or base64 (little-endian float32, as OpenAI sends them), usage as
billed. Agents always send floats, so what reaches the consumer never depends on what an agent
chose to encode.
"""

from __future__ import annotations

import msgspec

from coordinator.identity.users import Principal
from coordinator.market.vectors import dimensions_problem, encoded, reply_budget, shortened, vectors
from coordinator.money.requestlog import RequestRecord
from coordinator.services import inference
from coordinator.services.inference import Call, XPool
from coordinator.services.state import PoolState
from coordinator.serving.jobs import BUDGET_BASE
from shared import errors
from shared.openai import EmbeddingRequest, prompt_items


class Embedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    """The reply in OpenAI's shape, with the pool's ``x_pool``."""

    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    x_pool: XPool | None = None


_json = msgspec.json.Encoder()


async def embed(
    pool: PoolState, principal: Principal, record: RequestRecord, data: EmbeddingRequest, raw: bytes
) -> tuple[bytes, dict[str, str]]:
    """Run one embeddings request to its reply and its headers (:class:`inference.Refusal` instead)."""
    call = await inference.admit(pool, principal, record, data, raw)
    try:
        return await _run(call, data), call.limits
    except inference.Refusal:
        raise
    except BaseException:
        call.end(inference.Ending(500, errors.INTERNAL_ERROR))
        raise


async def _run(call: Call, data: EmbeddingRequest) -> bytes:
    directory = call.pool.directory
    if data.dimensions is not None:
        for slug in data.models:
            problem = dimensions_problem(directory.get(slug), slug, data.dimensions)
            if problem is not None:
                raise call.refuse(400, errors.INVALID_REQUEST, problem, "dimensions")
    inputs = len(prompt_items(data.input, "input"))  # admission checked the form
    sizes = [info.dimensions if (info := directory.get(slug)) is not None else None for slug in data.models]
    call.output_bytes = BUDGET_BASE + max(reply_budget(inputs, size) for size in sizes)
    attempt = await call.start()
    info = directory.get(attempt.route.model)
    size = info.dimensions if info is not None else None
    found: list[list[float]] = []

    def unusable(body: bytes) -> str | None:
        result = vectors(body, inputs, size)
        if isinstance(result, str):
            return result
        found.extend(result)
        return None

    _, x_pool = await call.reply(unusable)
    if data.dimensions is not None:
        found[:] = [shortened(vector, data.dimensions) for vector in found]
    record = call.record
    reply = EmbeddingList(
        data=[Embedding(index=i, embedding=encoded(vector, data.encoding_format)) for i, vector in enumerate(found)],
        model=record.model,
        usage=EmbeddingUsage(record.prompt_tokens, record.prompt_tokens),
        x_pool=x_pool,
    )
    return _json.encode(reply)
