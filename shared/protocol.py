"""The coordinator <-> agent websocket protocol (DESIGN §4).

Every message is a tagged msgspec Struct (``tag_field="type"``) sent as one binary msgpack frame.
Evolution rules: new fields get defaults, types never change, unknown fields are ignored, and an
unknown tag is reported as :class:`UnknownMessage` so the receiver can log and skip it.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 2
# Versions a coordinator accepts: 1 announced no job kinds (its agents serve chat only).
SUPPORTED_VERSIONS = frozenset({1, 2})

# Job kinds (``JobAssign.kind``, ``ModelOffer.kinds``): which of the backend's OpenAI endpoints a job runs on.
CHAT = "chat"  # /v1/chat/completions
COMPLETION = "completion"  # /v1/completions
EMBEDDING = "embedding"  # /v1/embeddings
KINDS = (CHAT, COMPLETION, EMBEDDING)

# Websocket close codes the coordinator uses (4xxx: the application's, after HTTP's meanings).
CLOSE_PROTOCOL_ERROR = 4400  # a bad frame, a second hello, a rejected hello
CLOSE_UNAUTHORIZED = 4401  # the agent token is not valid
CLOSE_REVOKED = 4403  # the agent token was revoked while connected
CLOSE_STALE = 4408  # heartbeats missed
CLOSE_RATE = 4429  # too many messages, or too many failed authentications
CLOSE_TOO_BIG = 1009  # a frame over the limit
CLOSE_UNSUPPORTED_DATA = 1003  # a text frame
CLOSE_DRAINING = 1012  # the coordinator is shutting down: reconnect at once, to another ("service restart")


class Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    """Base of every websocket message."""


class Usage(msgspec.Struct, omit_defaults=True):
    """Token counts as the backend reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelOffer(msgspec.Struct, omit_defaults=True):
    """One model an agent serves; prices are nano-USD per token. An empty ``slug`` asks the
    coordinator to find it from ``backend_model`` in its directory; an empty ``quantization`` asks
    it to read one from ``backend_model`` (``…-q4_k_m.gguf``). ``kinds``: the job kinds the backend
    serves for it (empty: chat only, as agents announced before kinds existed)."""

    slug: str
    backend_model: str
    price_in: int
    price_out: int
    context_window: int | None = None
    quantization: str = ""
    kinds: list[str] = []

    def serves(self, kind: str) -> bool:
        return kind in self.kinds if self.kinds else kind == CHAT


class Limits(msgspec.Struct, omit_defaults=True):
    """Per-connection limits the coordinator enforces."""

    max_frame_bytes: int
    max_messages_per_second: int


# --- agent -> coordinator ---------------------------------------------------------------------


class Hello(Message, tag="hello"):
    protocol: int
    agent_version: str
    models: list[ModelOffer]
    max_concurrency: int
    hardware: dict[str, str] = {}


class Heartbeat(Message, tag="heartbeat"):
    in_flight: int = 0


class JobChunk(Message, tag="job.chunk"):
    """One piece of output: an SSE event's JSON payload, or (non-stream) part of the response body."""

    job_id: str
    seq: int
    data: bytes


class JobDone(Message, tag="job.done"):
    """The job finished. ``tail`` holds the last chunks, withheld so the coordinator can stamp the
    very last one with ``x_pool`` (the finish-reason chunk and, when asked for, the usage chunk)."""

    job_id: str
    usage: Usage | None = None
    finish_reason: str | None = None
    tail: list[bytes] = []


class JobFailed(Message, tag="job.failed"):
    job_id: str
    code: str
    message: str
    retryable: bool = False
    status: int | None = None


class JobProgress(Message, tag="job.progress"):
    """The agent is still working on a non-stream job (sent every ``Welcome.progress_interval``
    while its backend has not answered), so silence can be told from a long reply."""

    job_id: str


class Draining(Message, tag="draining"):
    """The agent takes no new jobs and will close once its in-flight jobs finish."""


# --- coordinator -> agent ---------------------------------------------------------------------


class Welcome(Message, tag="welcome"):
    """``whole_replies``: the coordinator takes a non-streamed reply whole in ``JobDone.tail`` (one
    frame instead of a ``JobChunk`` and a ``JobDone``); agents send two frames to one that does not."""

    agent_id: str
    heartbeat_interval: float
    limits: Limits
    models: dict[str, str] = {}  # backend model -> the directory slug it is served as
    whole_replies: bool = False
    progress_interval: float = 0.0  # seconds between JobProgress on non-stream jobs (0: none)


class JobAssign(Message, tag="job.assign"):
    """Run ``request`` (the body to send the backend) on ``backend_model``, at the endpoint of
    ``kind`` (left out, as older coordinators did: chat). Only agents that announced the kind for
    the model get such a job: an older agent would run any job as chat."""

    job_id: str
    model: str
    backend_model: str
    request: bytes
    stream: bool
    want_usage: bool
    deadline: float
    request_id: str = ""  # the consumer request's id, for the agent's logs (empty for a canary)
    kind: str = CHAT


class JobCancel(Message, tag="job.cancel"):
    job_id: str


class Reject(Message, tag="reject"):
    reason: str


AgentMessage = Hello | Heartbeat | JobChunk | JobDone | JobFailed | JobProgress | Draining
CoordinatorMessage = Welcome | JobAssign | JobCancel | Reject


class UnknownMessage(msgspec.Struct):
    """A well-formed frame whose tag this side does not know (sent by a newer peer)."""

    tag: str


class ProtocolError(Exception):
    """A frame that is not a valid message: not msgpack, not a map, or a known tag with bad fields."""


class _Tagged(msgspec.Struct):
    type: str


class _Codec:
    def __init__(self, union: object, tags: set[str]) -> None:
        self._decoder: msgspec.msgpack.Decoder[object] = msgspec.msgpack.Decoder(union)
        self._tag_decoder = msgspec.msgpack.Decoder(_Tagged)
        self._tags = tags

    def decode(self, frame: bytes) -> object:
        """Decode one frame; unknown tags give :class:`UnknownMessage`, anything malformed raises."""
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, RecursionError) as exc:  # nesting too deep is malformed too
            try:
                tag = self._tag_decoder.decode(frame).type
            except (msgspec.DecodeError, RecursionError):
                raise ProtocolError(f"invalid frame: {exc}") from None
            if tag not in self._tags:
                return UnknownMessage(tag)
            raise ProtocolError(f"invalid {tag!r} message: {exc}") from None


def _tags(*types: type[Message]) -> set[str]:
    return {str(t.__struct_config__.tag) for t in types}


_encoder = msgspec.msgpack.Encoder()


def encode(message: Message) -> bytes:
    """Encode one message as a msgpack frame."""
    return _encoder.encode(message)


def agent_decoder() -> _Codec:
    """Decoder the coordinator uses for frames from agents."""
    return _Codec(AgentMessage, _tags(Hello, Heartbeat, JobChunk, JobDone, JobFailed, JobProgress, Draining))


def coordinator_decoder() -> _Codec:
    """Decoder the agent uses for frames from the coordinator."""
    return _Codec(CoordinatorMessage, _tags(Welcome, JobAssign, JobCancel, Reject))
