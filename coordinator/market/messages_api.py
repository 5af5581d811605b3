"""Anthropic's Messages API (``POST /v1/messages``) on top of the pool's chat completions.

Consumers with Anthropic's SDK or tools built on it use the pool without a second code path: the
route decodes the body into :class:`MessagesRequest`, runs :func:`to_chat`'s body through the chat
path, and turns what comes back into Anthropic's shapes (:func:`from_chat` for a whole reply,
:class:`MessageStream` for a stream's SSE events, :func:`error_body` for errors). Pure code, no I/O.

Refused with :class:`ShapeError`, since no chat backend can honour them: server tools, image URLs
and files (providers never fetch for a consumer), documents and other non-chat content blocks, more
than four stop sequences. Accepted and ignored: ``thinking`` and ``service_tier`` (open models are
run as they are served; thinking blocks sent back in history are dropped), ``cache_control``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from shared.openai import ProviderPreferences

Json = dict[str, Any]

_encode = msgspec.json.Encoder().encode
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what the chat path's FunctionDefinition takes
_DROPPED = frozenset({"thinking", "redacted_thinking"})  # the model's own reasoning, echoed back
_ALLOWED = {"user": frozenset({"text", "image", "tool_result"}), "assistant": frozenset({"text", "tool_use"})}
_MAX_STOP = 4  # the chat path's limit (Anthropic's own is higher)

# Anthropic's error types by HTTP status ("Errors" in Anthropic's API docs). The pool's 502 (a
# provider failed) is an unexpected server-side error; its 503 (no capacity, draining) is overload.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class ShapeError(Exception):
    """A request that decodes but cannot be put as a chat completion; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --- the request ---------------------------------------------------------------------------------


class TextBlock(msgspec.Struct):
    """A ``text`` content block (``cache_control`` and ``citations`` are ignored)."""

    text: str
    type: Literal["text"] = "text"


class ImageSource(msgspec.Struct):
    type: str
    media_type: str | None = None
    data: str | None = None


class ImageBlock(msgspec.Struct):
    source: ImageSource


class ToolUseBlock(msgspec.Struct):
    id: str
    name: str
    input: Json


class ToolResultBlock(msgspec.Struct):
    tool_use_id: str
    content: str | list[Json] = ""
    is_error: bool = False


class ToolDefinition(msgspec.Struct):
    """A client tool; Anthropic's server tools (``web_search_…``, ``bash_…``) have another ``type``."""

    name: str
    input_schema: Json
    description: str | None = None
    strict: bool | None = None


class ToolChoice(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(msgspec.Struct):
    user_id: str | None = None


class InputMessage(msgspec.Struct):
    """A turn; its blocks stay raw so that :func:`to_chat` can name a bad one by its path."""

    role: Literal["user", "assistant"]
    content: str | list[Json]


class MessagesRequest(msgspec.Struct, kw_only=True):
    """The body of ``POST /v1/messages`` as the pool takes it; unknown fields are ignored."""

    model: Annotated[str, Meta(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Meta(ge=1)]
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    tools: list[Json] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    provider: ProviderPreferences | None = None  # the pool's routing preferences, as on the chat path
    thinking: Json | None = None  # accepted, ignored
    service_tier: str | None = None  # accepted, ignored


def to_chat(req: MessagesRequest) -> Json:
    """The chat-completions body that asks the same of a backend as ``req``."""
    messages: list[Json] = []
    system = req.system if isinstance(req.system, str) else "\n".join(b.text for b in req.system or [])
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(req.messages):
        messages.extend(_turn(message, f"messages[{i}]"))
    body: Json = {"model": req.model, "messages": messages, "max_tokens": req.max_tokens, "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.stop_sequences:
        if len(req.stop_sequences) > _MAX_STOP or not all(req.stop_sequences):
            raise ShapeError(f"at most {_MAX_STOP} non-empty stop_sequences are supported", "stop_sequences")
        body["stop"] = req.stop_sequences
    for key, value in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k)):
        if value is not None:
            body[key] = value
    body.update(_tools(req.tools or [], req.tool_choice))
    if req.metadata is not None and req.metadata.user_id:
        body["user"] = req.metadata.user_id
    if req.provider is not None:
        body["provider"] = {k: v for k, v in msgspec.to_builtins(req.provider).items() if v is not None}
    return body


def _turn(message: InputMessage, where: str) -> list[Json]:
    """One Anthropic turn as chat messages: a user turn's tool results come first, as ``tool``
    messages (chat wants them right after the assistant's calls), then the rest of the turn."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    tool_messages: list[Json] = []
    parts: list[Json] = []
    calls: list[Json] = []
    for j, raw in enumerate(message.content):
        block = _block(raw, message.role, f"{where}.content[{j}]")
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, f"{where}.content[{j}]")}})
        elif isinstance(block, ToolUseBlock):
            function = {"name": block.name, "arguments": _encode(block.input).decode()}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, ToolResultBlock):
            result = _result_text(block, f"{where}.content[{j}]")
            tool_messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
    if message.role == "assistant":
        text = "".join(part["text"] for part in parts)
        turn: Json = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            turn["tool_calls"] = calls
        return [turn]
    if parts or not tool_messages:
        single = len(parts) == 1 and parts[0]["type"] == "text"
        content: str | list[Json] = parts[0]["text"] if single else parts or ""
        tool_messages.append({"role": "user", "content": content})
    return tool_messages


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock
_BLOCK_TYPES: dict[str, type[Block]] = {"text": TextBlock, "image": ImageBlock, "tool_use": ToolUseBlock}
_BLOCK_TYPES["tool_result"] = ToolResultBlock


def _block(raw: Json, role: str, where: str) -> Block | None:
    """A content block checked against its role; ``None`` for one to drop (thinking)."""
    kind = raw.get("type")
    if kind in _DROPPED:
        return None
    if not isinstance(kind, str) or kind not in _BLOCK_TYPES:
        raise ShapeError(f"content block type {kind!r} is not supported", f"{where}.type")
    if kind not in _ALLOWED[role]:
        raise ShapeError(f"a {kind} block cannot be in a {role} message", f"{where}.type")
    try:
        return msgspec.convert(raw, _BLOCK_TYPES[kind])
    except msgspec.ValidationError as exc:
        raise ShapeError(f"invalid {kind} block: {exc}", where) from None


def _image_url(block: ImageBlock, where: str) -> str:
    """An inline image as a ``data:`` URL; URLs and files are refused, as on the chat path."""
    source = block.source
    if source.type != "base64":
        raise ShapeError(
            f"image source type {source.type!r} is not supported: send images as base64", f"{where}.source"
        )
    if source.media_type not in _IMAGE_TYPES or not source.data:
        raise ShapeError(f"a base64 image needs data and one of {sorted(_IMAGE_TYPES)}", f"{where}.source")
    return f"data:{source.media_type};base64,{source.data}"


def _result_text(block: ToolResultBlock, where: str) -> str:
    """A tool result's text (chat tool messages carry text only), marked when it is an error."""
    if isinstance(block.content, str):
        text = block.content
    else:
        texts = []
        for k, item in enumerate(block.content):
            if item.get("type") != "text" or not isinstance(item.get("text"), str):
                raise ShapeError("tool_result content must be text blocks", f"{where}.content[{k}].type")
            texts.append(item["text"])
        text = "\n".join(texts)
    return f"Error: {text}" if block.is_error else text


def _tools(raw_tools: list[Json], choice: ToolChoice | None) -> Json:
    """The chat fields for the tools and the tool choice."""
    tools = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(raw_tools)]
    out: Json = {"tools": tools} if tools else {}
    if choice is None:
        return out
    if not tools:
        if choice.type in ("any", "tool"):
            raise ShapeError(f"tool_choice {choice.type!r} needs tools", "tool_choice")
        return out
    if choice.type == "tool":
        if choice.name not in {tool["function"]["name"] for tool in tools}:
            raise ShapeError(f"tool_choice names no tool of this request: {choice.name!r}", "tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use:
        out["parallel_tool_calls"] = False
    return out


def _tool(raw: Json, where: str) -> Json:
    """A client tool as a chat function tool; server tools have nothing to run them."""
    kind = raw.get("type")
    if kind not in (None, "custom"):
        raise ShapeError(f"tool type {kind!r} is not supported: only client tools with input_schema", f"{where}.type")
    try:
        tool = msgspec.convert(raw, ToolDefinition)
    except msgspec.ValidationError as exc:
        raise ShapeError(f"invalid tool: {exc}", where) from None
    if not _TOOL_NAME.fullmatch(tool.name):
        raise ShapeError("tool names are 1-64 letters, digits, '_' or '-'", f"{where}.name")
    function: Json = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


# --- the reply -----------------------------------------------------------------------------------


def from_chat(chat: Json, *, message_id: str, model: str) -> Json:
    """A chat completion as Anthropic's Message, keeping the pool's ``x_pool``. Arguments that are
    not a JSON object become ``{}`` (``input`` must be an object)."""
    choice: Json = (chat.get("choices") or [{}])[0]
    message: Json = choice.get("message") or {}
    content: list[Json] = []
    text = _text_of(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    calls: list[Json] = message.get("tool_calls") or []
    for n, call in enumerate(calls):
        function: Json = call.get("function") or {}
        tool_id = call.get("id") or f"toolu_{message_id}_{n}"  # for a call the backend left unnamed
        name = function.get("name") or ""
        content.append(
            {"type": "tool_use", "id": tool_id, "name": name, "input": _arguments(function.get("arguments"))}
        )
    stop_reason, stop_sequence = _stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), bool(calls))
    out: Json = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(chat.get("usage") or {}),
    }
    if "x_pool" in chat:
        out["x_pool"] = chat["x_pool"]
    return out


def _text_of(content: Any) -> str:
    """A chat message's text, whether a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _usage(usage: Json) -> Json:
    """Chat's token counts under Anthropic's names (the prompt is all ``input_tokens``, as billed)."""
    return {"input_tokens": usage.get("prompt_tokens") or 0, "output_tokens": usage.get("completion_tokens") or 0}


def _arguments(arguments: Any) -> Json:
    try:
        value = msgspec.json.decode(arguments) if isinstance(arguments, str) and arguments else {}
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop_reason(finish: Any, matched: Any, called: bool) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a chat ``finish_reason``. A matched stop
    string is known only from backends that report it (vLLM's ``stop_reason``)."""
    if called or finish in ("tool_calls", "function_call"):
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if finish == "content_filter":
        return "refusal", None
    if isinstance(matched, str) and matched:
        return "stop_sequence", matched
    return "end_turn", None


# --- streaming -----------------------------------------------------------------------------------


def _event(data: Json) -> bytes:
    """One SSE event, named by the data's ``type`` as Anthropic does."""
    return b"event: " + str(data["type"]).encode() + b"\ndata: " + _encode(data) + b"\n\n"


@dataclass
class _Call:
    """A streamed tool call; its block starts once its name is known."""

    id: str = ""
    name: str = ""
    block: int | None = None
    pending: str = ""  # arguments that came before the name


class MessageStream:
    """Turns a chat stream's chunks into Anthropic's stream events, one content block at a time:
    text, then each tool call with its arguments passed on as they come (``input_json_delta``)."""

    def __init__(self, *, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self._started = False
        self._done = False
        self._blocks = 0  # content blocks started so far
        self._open: int | None = None  # the open block's index
        self._text_open = False
        self._calls: dict[int, _Call] = {}
        self._finish: Any = None
        self._matched: Any = None
        self._usage: Json | None = None
        self._x_pool: Json = {}

    def start(self) -> list[bytes]:
        """``message_start`` (no content, no counts yet: chat reports usage at the end) and a ping."""
        if self._started:
            return []
        self._started = True
        message = from_chat({}, message_id=self.message_id, model=self.model) | {"stop_reason": None}
        return [_event({"type": "message_start", "message": message}), _event({"type": "ping"})]

    def feed(self, chunk: Json) -> list[bytes]:
        """The events for one chat chunk (often none: a role-only delta, a usage chunk)."""
        out = self.start()
        if "x_pool" in chunk:
            self._x_pool = {"x_pool": chunk["x_pool"]}
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in (chunk.get("choices") or [])[:1]:
            delta: Json = choice.get("delta") or {}
            text = _text_of(delta.get("content"))
            if text:
                out += self._text(text)
            for call in delta.get("tool_calls") or []:
                out += self._tool(call)
            self._finish = choice.get("finish_reason") or self._finish
            self._matched = choice.get("stop_reason") or self._matched
        return out

    def finish(self) -> list[bytes]:
        """Closes the open block and ends the message with its stop reason and usage."""
        if self._done:
            return []
        out = self.start()
        for n, call in self._calls.items():  # a call whose name never came still gets its block
            if call.block is None:
                out += self._start_call(call, n)
        out += self._close()
        self._done = True
        reason, sequence = _stop_reason(self._finish, self._matched, bool(self._calls))
        usage = {"output_tokens": 0} if self._usage is None else _usage(self._usage)  # cumulative, as in the SDK
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        out.append(_event({"type": "message_delta", "delta": delta, "usage": usage} | self._x_pool))
        out.append(_event({"type": "message_stop"}))
        return out

    def fail(self, status: int, message: str) -> list[bytes]:
        """An ``error`` event ending the stream (Anthropic's SDK raises it as an API error)."""
        self._done = True
        return [_event(error_body(status, message))]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open, self._text_open = self._open, None, False
        return [_event({"type": "content_block_stop", "index": index})]

    def _begin(self, block: Json) -> list[bytes]:
        out = self._close()
        self._open = self._blocks
        self._blocks += 1
        return [*out, _event({"type": "content_block_start", "index": self._open, "content_block": block})]

    def _text(self, text: str) -> list[bytes]:
        out = [] if self._text_open else self._begin({"type": "text", "text": ""})
        self._text_open = True
        delta = {"type": "text_delta", "text": text}
        return [*out, _event({"type": "content_block_delta", "index": self._blocks - 1, "delta": delta})]

    def _tool(self, piece: Json) -> list[bytes]:
        """One tool-call delta: ``index`` picks the call (a new ``id`` without one starts a call)."""
        index = piece.get("index")
        if not isinstance(index, int):
            ids, tool_id = {c.id: n for n, c in self._calls.items()}, piece.get("id")
            index = ids.get(tool_id, len(self._calls)) if tool_id else max(self._calls, default=0)
        call = self._calls.setdefault(index, _Call())
        function: Json = piece.get("function") or {}
        call.id = call.id or piece.get("id") or ""
        arguments: str = function.get("arguments") or ""
        if call.block is not None:  # a block once stopped takes no more (another began after it)
            return self._arguments(call.block, arguments) if call.block == self._open else []
        call.name = function.get("name") or call.name
        call.pending += arguments
        return self._start_call(call, index) if call.name else []

    def _start_call(self, call: _Call, n: int) -> list[bytes]:
        call.block = self._blocks
        tool_id = call.id or f"toolu_{self.message_id}_{n}"
        out = self._begin({"type": "tool_use", "id": tool_id, "name": call.name, "input": {}})
        pending, call.pending = call.pending, ""
        return out + self._arguments(call.block, pending)

    @staticmethod
    def _arguments(block: int, arguments: str) -> list[bytes]:
        if not arguments:
            return []
        delta = {"type": "input_json_delta", "partial_json": arguments}
        return [_event({"type": "content_block_delta", "index": block, "delta": delta})]


# --- errors --------------------------------------------------------------------------------------


def error_body(status: int, message: str) -> Json:
    """Anthropic's error object for a response or an ``error`` stream event. Statuses without a type
    of their own are ``invalid_request_error`` if 4xx (as Anthropic documents), else ``api_error``."""
    kind = _ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}
