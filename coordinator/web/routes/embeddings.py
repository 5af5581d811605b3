"""``POST /v1/embeddings``: OpenAI-compatible; :mod:`coordinator.services.embeddings` runs it."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post

from coordinator.core.errors import error_response
from coordinator.services import embeddings
from coordinator.services.inference import Refusal
from coordinator.services.state import PoolState
from coordinator.web.guards import require_consumer_key
from shared.openai import EmbeddingRequest


@post(
    "/v1/embeddings",
    before_request=require_consumer_key,  # runs before the body is parsed, as a guard would
    summary="Create embeddings",
    description=(
        "OpenAI-compatible embeddings of one input or many (strings or token ids, up to 2,048), served by an agent "
        "whose backend embeds with the model, or the platform upstream. Billed at the offer's input price for "
        "the prompt tokens. `encoding_format` is `float` or `base64`; `dimensions` only for models whose "
        "directory entry says `matryoshka` (a 400 otherwise)."
    ),
    tags=["inference"],
    status_code=200,
)
async def create_embeddings(request: Request[Any, Any, Any], data: EmbeddingRequest, pool: PoolState) -> Response[Any]:
    try:
        body, headers = await embeddings.embed(
            pool, request.state.principal, request.state.record, data, await request.body()
        )
    except Refusal as refusal:
        return error_response(refusal.status, refusal.code, refusal.message, refusal.param, refusal.headers)
    return Response(body, media_type="application/json", headers=headers)
