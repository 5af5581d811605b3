"""What a request may cost before it runs, and what it did cost after: pure arithmetic, no I/O.

Before dispatch the pool holds the worst case: a bound on the prompt's tokens x the input price plus
the output cap x the output price. After, it bills the usage the server reported, capped at what it
could have produced and at what the coordinator counted; a stream that was cut bills only the
completion tokens that reached the consumer, and, when the consumer cut it, an estimate of the
prompt the provider had already processed.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.openai import ChatCompletionRequest, ConsumerRequest, EmbeddingRequest
from shared.protocol import Usage

# A chat template adds a few tokens per message (and some templates a default system prompt) beyond
# the body's bytes; the JSON punctuation of each message already outweighs them, this covers the rest.
TEMPLATE_ALLOWANCE = 256


@dataclass(frozen=True)
class Price:
    """Nano-USD per token."""

    input: int
    output: int

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return prompt_tokens * self.input + completion_tokens * self.output

    def covers(self, other: Price) -> bool:
        return other.input <= self.input and other.output <= self.output


def prompt_bound(raw: bytes) -> int:
    """An upper bound on the prompt's tokens: byte-level tokenizers never make more tokens than bytes."""
    return len(raw) + TEMPLATE_ALLOWANCE


# Characters per token for the prompt estimate: English averages about four with today's BPE
# vocabularies; every message adds a few tokens of template around it.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def prompt_estimate(request: ConsumerRequest) -> int:
    """What a prompt's tokens probably are, without a tokenizer: its text's characters / 4 plus a
    few per message (token ids count one each). Billed only when the backend's own count is missing
    (the consumer hung up) or unbelievable (above :func:`prompt_bound`)."""
    if not isinstance(request, ChatCompletionRequest):
        prompt = request.input if isinstance(request, EmbeddingRequest) else request.prompt
        items = [prompt] if isinstance(prompt, str) else prompt
        return sum(len(item) // CHARS_PER_TOKEN if isinstance(item, str) else _ids(item) for item in items)
    chars = 0
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            chars += len(content)
        elif content:
            chars += sum(len(part.text) for part in content if part.text)
    return chars // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(request.messages)


def _ids(item: object) -> int:
    return len(item) if isinstance(item, list) else 1


def output_bound(request: ConsumerRequest, model_cap: int) -> int:
    """The most completion tokens the request can produce: its own limit, else the model's cap
    (an embedding produces none)."""
    if isinstance(request, EmbeddingRequest):
        return 0
    asked = request.max_completion_tokens or request.max_tokens
    return min(asked, model_cap) if asked else model_cap


@dataclass(frozen=True)
class Bill:
    prompt_tokens: int
    completion_tokens: int
    reported: Usage | None
    capped: bool

    def amount(self, price: Price) -> int:
        return price.cost(self.prompt_tokens, self.completion_tokens)


class Meter:
    """Counts what one request delivered (``delivered``: text deltas handed to the consumer's
    connection) and turns it into billable tokens."""

    __slots__ = ("completion_bound", "delivered", "prompt_bound", "prompt_estimate", "usage")

    def __init__(self, prompt_tokens_bound: int, completion_tokens_bound: int, prompt_tokens_estimate: int = 0) -> None:
        self.prompt_bound = prompt_tokens_bound
        self.completion_bound = completion_tokens_bound
        self.prompt_estimate = min(prompt_tokens_estimate, prompt_tokens_bound)
        self.delivered = 0
        self.usage: Usage | None = None

    def hold_amount(self, price: Price) -> int:
        return price.cost(self.prompt_bound, self.completion_bound)

    def bill(self, *, completed: bool, stream: bool, consumer_left: bool = False, counted: Usage | None = None) -> Bill:
        """Billable tokens. A completed request bills its reported usage (or ``counted``, what the
        audit counted when the report can't be believed), capped at the bounds (a stream without
        usage bills the text deltas counted); a cut stream bills the delivered deltas only, plus
        the prompt's estimate when the consumer cut it (the provider did that work); a non-stream
        request that did not complete delivered nothing. ``Bill.reported`` is the agent's report."""
        usage = self.usage
        if not completed:
            delivered = min(self.delivered, self.completion_bound) if stream else 0
            prompt = self.prompt_estimate if consumer_left and stream else 0
            return Bill(prompt, delivered, usage, capped=False)
        if usage is None:
            return Bill(0, min(self.delivered, self.completion_bound), None, capped=False)
        billed = counted or usage
        prompt = min(max(0, billed.prompt_tokens), self.prompt_bound)
        completion = min(max(0, billed.completion_tokens), self.completion_bound)
        capped = prompt != billed.prompt_tokens or completion != billed.completion_tokens
        return Bill(prompt, completion, usage, capped=capped)
