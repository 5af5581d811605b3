"""Revoking a consumer key or an agent token, or changing a key's policy, takes effect on every
replica at once: the change is written, then pushed (:class:`coordinator.core.cluster.Revoked`,
:class:`~coordinator.core.cluster.KeyChanged`); each replica forgets the cached credential (and
drops a revoked token's agents). Without Redis the push reaches this process alone, and other
processes see it within their cache's second, and their revocation sweep's."""

from __future__ import annotations

from coordinator.core.cluster import AGENT_TOKEN, KEY, KeyChanged, Push, Revoked
from coordinator.core.models import ApiKey
from coordinator.identity import users
from coordinator.identity.policies import KeyPolicy
from coordinator.services.presence import remove_agent
from coordinator.services.state import PoolState
from shared.protocol import CLOSE_REVOKED


async def revoke(pool: PoolState, model: users.Credential, user_id: int, credential_id: int) -> bool:
    """Revoke one of the user's own keys or tokens; ``False`` if it is not theirs or already revoked."""
    async with pool.db_sessions() as session, session.begin():
        revoked = await users.revoke_credential(session, model, user_id, credential_id)
    if revoked:
        await pool.cluster.push(Revoked(KEY if model is ApiKey else AGENT_TOKEN, credential_id))
    return revoked


async def set_policy(pool: PoolState, key_id: int, policy: KeyPolicy, user_id: int | None) -> bool:
    """Replace a key's policy (one of ``user_id``'s, when given); every replica reads it again on the
    key's next request. ``False`` if there is no such live key."""
    async with pool.db_sessions() as session, session.begin():
        changed = await users.set_key_policy(session, key_id, policy, user_id)
    if changed:
        await pool.cluster.push(KeyChanged(key_id))
    return changed


def on_push(pool: PoolState, push: Push) -> None:
    """What a replica does with a push."""
    if isinstance(push, KeyChanged):
        pool.consumer_keys.forget(push.key_id)
        return
    if not isinstance(push, Revoked):
        return
    if push.credential == KEY:
        pool.consumer_keys.forget(push.credential_id)
        return
    pool.agent_tokens.forget(push.credential_id)
    for agent in pool.registry.local():
        if agent.token_id == push.credential_id:
            remove_agent(pool, agent, "agent token revoked", CLOSE_REVOKED)
