"""Error codes of the public API (DESIGN §7) and of the agent protocol.

The HTTP envelope is ``{"error": {"message", "type", "code", "param"}}``; ``type`` follows OpenAI's
names so the official SDKs classify errors as they would against OpenAI.
"""

from __future__ import annotations

INVALID_REQUEST = "invalid_request"
INVALID_API_KEY = "invalid_api_key"
INVALID_SESSION = "invalid_session"
INVALID_CREDENTIALS = "invalid_credentials"
CONFLICT = "conflict"
IDEMPOTENCY_CONFLICT = "idempotency_key_reused"
INSUFFICIENT_CREDITS = "insufficient_credits"
POLICY_BLOCKED = "policy_blocked"
API_DISABLED = "api_disabled"  # the key is paused by its owner
MODEL_NOT_FOUND = "model_not_found"
NOT_FOUND = "not_found"
REQUEST_TOO_LARGE = "request_too_large"
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
PROVIDER_ERROR = "provider_error"
NO_CAPACITY = "no_capacity"
INTERNAL_ERROR = "internal_error"
DATABASE_UNAVAILABLE = "database_unavailable"  # the coordinator cannot reach its database: retry shortly
SHUTTING_DOWN = "shutting_down"  # this coordinator is draining: a retry reaches another
PAYMENTS_UNAVAILABLE = "payments_unavailable"  # no payment provider configured, or it cannot be reached
INVALID_SIGNATURE = "invalid_signature"  # a payment provider's webhook that does not verify
PAYOUT_BELOW_MINIMUM = "payout_below_minimum"
PAYOUT_ACCOUNT_MISSING = "payout_account_missing"
INSUFFICIENT_EARNINGS = "insufficient_earnings"  # more than the matured earnings
PAYOUT_STATE = "payout_state"  # the payout is not in the state the step needs
DEBT_OUTSTANDING = "debt_outstanding"  # a chargeback's debt must be paid before a payout

# Job failure codes an agent reports in ``JobFailed``.
BACKEND_UNAVAILABLE = "backend_unavailable"
BACKEND_ERROR = "backend_error"
BACKEND_REJECTED = "backend_rejected"
AGENT_BUSY = "agent_busy"
AGENT_DRAINING = "agent_draining"
DEADLINE_EXCEEDED = "deadline_exceeded"
OUTPUT_OVERRUN = "output_overrun"  # the coordinator cut a job that sent more than the request allows
CONSUMER_TOO_SLOW = "consumer_too_slow"  # the coordinator cut a job whose consumer stopped reading
TIMED_OUT = "timed_out"  # the coordinator waited for a job's next output in vain
AGENT_LOST = "agent_lost"  # the agent running the job went away
RELAY_LOST = "relay_lost"  # the replica holding the agent, or Redis between the two, went away

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "provider_error",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    """OpenAI-style ``type`` for an HTTP status."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
