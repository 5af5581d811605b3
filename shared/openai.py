"""OpenAI request shapes (chat completions, text completions, embeddings) and views of replies.

:class:`ChatCompletionRequest`, :class:`CompletionRequest` and :class:`EmbeddingRequest` validate a
consumer's body (types, ranges, required fields); the coordinator forwards the fields it knows
(``coordinator/market/forward.py``).
The ``*View`` structs read just what the pool needs out of a backend's responses and chunks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from shared.protocol import Usage

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ImageUrl(msgspec.Struct):
    url: str
    detail: str | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(msgspec.Struct):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(msgspec.Struct):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(msgspec.Struct):
    name: str
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
StopWord = Annotated[str, Meta(min_length=1)]


ModelName = Annotated[str, Meta(min_length=1, max_length=200)]
NonNegative = Annotated[float, Meta(ge=0.0)]
ProviderName = Annotated[str, Meta(min_length=1, max_length=200)] | int
ProviderNames = Annotated[list[ProviderName], Meta(max_length=64)]


class MaxPrice(msgspec.Struct, forbid_unknown_fields=True):
    """The most the consumer pays, in USD per million tokens (as OpenRouter takes it)."""

    prompt: NonNegative | None = None
    completion: NonNegative | None = None


class ProviderPreferences(msgspec.Struct, forbid_unknown_fields=True):
    """The request's ``provider`` object: how to route it, with OpenRouter's names. Providers are
    named by slug (``/v1/providers``; a provider's old slugs still name it), agent id (``agt_…``),
    provider id (``x_pool.provider``) or ``"platform"`` (the upstream)."""

    sort: Literal["price", "latency", "throughput"] | None = None
    max_price: MaxPrice | None = None
    min_trust: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    order: ProviderNames | None = None
    only: ProviderNames | None = None
    ignore: ProviderNames | None = None
    allow_fallbacks: bool = True
    quantizations: Annotated[list[Annotated[str, Meta(min_length=1, max_length=32)]], Meta(max_length=32)] | None = None


MetadataKey = Annotated[str, Meta(min_length=1, max_length=64)]
MetadataValue = Annotated[str, Meta(max_length=512)]


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """The fields of ``POST /v1/chat/completions`` the pool checks before dispatching. ``model`` may
    be a list of models tried in order, ``auto`` (the pool picks), or left out (``""``), which a key
    whose policy names its models takes as ``auto`` among them."""

    model: ModelName | Annotated[list[ModelName], Meta(min_length=1, max_length=8)] = ""
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None
    stop: StopWord | Annotated[list[StopWord], Meta(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[int, Meta(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # tags the pool keeps with the request for the owner's audit (GET /v1/requests); never forwarded
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)] | None = None
    provider: ProviderPreferences | None = None

    @property
    def models(self) -> list[str]:
        """The requested models in the order to try them, without repeats."""
        return [self.model] if isinstance(self.model, str) else list(dict.fromkeys(self.model))


Prompt = str | Annotated[list[Any], Meta(min_length=1)]
MAX_PROMPT_ITEMS = 2048  # inputs (or prompts) in one request, as OpenAI takes them


class CompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/completions`` (legacy text completions): ``prompt`` is a string, a list of
    strings, a list of token ids or a list of such lists (:func:`prompt_items` checks which)."""

    model: ModelName | Annotated[list[ModelName], Meta(min_length=1, max_length=8)] = ""
    prompt: Prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Probability | None = None
    max_tokens: PositiveInt | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None
    stop: StopWord | Annotated[list[StopWord], Meta(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[int, Meta(ge=-100, le=100)]] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    user: str | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)] | None = None
    provider: ProviderPreferences | None = None

    max_completion_tokens = None  # chat's other name for the output limit: none here

    @property
    def models(self) -> list[str]:
        return [self.model] if isinstance(self.model, str) else list(dict.fromkeys(self.model))


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/embeddings``: ``input`` is a string, a list of strings, a list of token ids or a
    list of such lists (:func:`prompt_items` checks which)."""

    model: ModelName | Annotated[list[ModelName], Meta(min_length=1, max_length=8)] = ""
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)] | None = None
    provider: ProviderPreferences | None = None

    # what chat requests also have, constant here: embeddings are never streamed and make no tokens
    stream = False
    stream_options = max_tokens = max_completion_tokens = logprobs = None

    @property
    def models(self) -> list[str]:
        return [self.model] if isinstance(self.model, str) else list(dict.fromkeys(self.model))


ConsumerRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest


def has_token_ids(request: ConsumerRequest) -> bool:
    """Whether a completion's prompt or an embedding's input is given as token ids (text no one
    but the model's tokenizer can read)."""
    if isinstance(request, ChatCompletionRequest):
        return False
    given = request.input if isinstance(request, EmbeddingRequest) else request.prompt
    return isinstance(given, list) and any(not isinstance(item, str) for item in given)


class NotAPrompt(ValueError):
    """A prompt or input that is none of the four forms; ``param`` names the offending part."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def prompt_items(value: str | list[Any], name: str) -> list[str | list[int]]:
    """A prompt or input as its items (a string, or a list of token ids, each), checked: one form
    throughout, token ids non-negative integers, no empty item. :class:`NotAPrompt` otherwise."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        items = [value]
    else:
        items = value
    if len(items) > MAX_PROMPT_ITEMS:
        raise NotAPrompt(f"`{name}` holds {len(items)} items; at most {MAX_PROMPT_ITEMS} are taken at once.", name)
    checked: list[str | list[int]] = []
    for i, item in enumerate(items):
        where = name if len(items) == 1 and items[0] is value else f"{name}[{i}]"
        if isinstance(item, str):
            if not item:
                raise NotAPrompt(f"`{where}` is an empty string.", where)
        elif isinstance(item, list) and item:
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in item):
                raise NotAPrompt(f"`{where}` must be a list of token ids (non-negative integers).", where)
        else:
            raise NotAPrompt(
                f"`{where}` must be a non-empty string or list of token ids; `{name}` takes a string, a list of "
                "strings, a list of token ids or a list of such lists.",
                where,
            )
        checked.append(item)
    if len({type(item) for item in checked}) > 1:
        raise NotAPrompt(f"`{name}` mixes strings and token lists: send one form.", name)
    return checked


# --- reading backend output -------------------------------------------------------------------


class ErrorView(msgspec.Struct):
    message: str = ""
    code: str | int | None = None
    type: str | None = None


class ChoiceView(msgspec.Struct):
    finish_reason: str | None = None


class ChunkView(msgspec.Struct):
    """What the pool reads out of a streamed chunk or a whole response."""

    choices: list[ChoiceView] = []
    usage: Usage | None = None
    error: ErrorView | str | None = None


class ErrorBodyView(msgspec.Struct):
    error: ErrorView | str | None = None
    message: str | None = None
