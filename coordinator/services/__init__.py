"""The pool's use cases, each over the running pool's parts (state.PoolState): one inference
request, losing an agent, the figures of /v1/models and /v1/pool/status, a provider's standing, a
user's statements, signing in, and the background work (periodic)."""
