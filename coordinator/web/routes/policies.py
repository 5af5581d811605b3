"""A consumer key's policy (``identity/policies.py``), read and replaced by the key's owner in a
portal session. A change reaches every replica at once (``services/revocation.set_policy``)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Router, get, put
from litestar.params import Parameter

from coordinator.core.errors import PoolError
from coordinator.identity import users
from coordinator.identity.policies import KeyPolicy, PolicyError
from coordinator.services import revocation
from coordinator.services.state import pool_of
from coordinator.web.guards import require_session
from shared import errors

KeyId = Annotated[int, Parameter(ge=1, le=2**31 - 1)]


@get("/", summary="A consumer key's policy", operation_id="get_key_policy")
async def read_policy(request: Request[Any, Any, Any], key_id: KeyId) -> KeyPolicy:
    async with pool_of(request).db_sessions() as session:
        policy = await users.key_policy(session, key_id, request.state.user_id)
    if policy is None:
        raise PoolError(404, errors.NOT_FOUND, "No such consumer key.", param="id")
    return policy


@put(
    "/", summary="Replace a consumer key's policy (every coordinator applies it at once)", operation_id="set_key_policy"
)
async def replace_policy(request: Request[Any, Any, Any], key_id: KeyId, data: KeyPolicy) -> KeyPolicy:
    try:
        changed = await revocation.set_policy(pool_of(request), key_id, data.check(), request.state.user_id)
    except PolicyError as exc:
        raise PoolError(400, errors.INVALID_REQUEST, str(exc), param=str(exc).split(":", 1)[0]) from None
    if not changed:
        raise PoolError(404, errors.NOT_FOUND, "No such consumer key.", param="id")
    return data


policy_router = Router(
    "/v1/tokens/{key_id:int}/policy",
    route_handlers=[read_policy, replace_policy],
    guards=[require_session],
    tags=["portal"],
)
