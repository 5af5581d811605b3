"""Whether an agent can be believed: scores from evidence (scores), per-job checks (audit), canary
prompts and shapes, and the operator-trusted answers canaries are compared with (references)."""
