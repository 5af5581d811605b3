"""OpenAI's Responses API (``POST /v1/responses``) on top of the pool's chat completions.

The pool runs chat-completion jobs only, so a Responses request is translated into a chat body
(:func:`to_chat`), and the chat reply back into a Response object (:func:`from_chat`) or, when
streaming, chat chunks into Responses events (:class:`ResponseStream`). Pure code, no I/O.

Refused with :class:`ShapeError`: what needs state the pool does not keep (``previous_response_id``,
``conversation``, stored ``prompt``, ``background``; the consumer sends the whole conversation in
``input``), tools other than functions, input items other than messages, function calls and their
outputs, content parts other than text and images given by URL. Accepted and ignored: ``store``,
``reasoning``, ``truncation``, ``include`` and unknown fields. ``developer`` messages go as
``system`` (what open models' chat templates know). The chat body is built field by field, so
nothing else of the request reaches a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from shared.openai import FunctionDefinition, MetadataKey, MetadataValue, ModelName, ProviderPreferences

T = TypeVar("T")
Status = Literal["completed", "incomplete", "failed", "in_progress"]

# what OpenAI's ``response.incomplete_details.reason`` says for a chat finish_reason that stopped early
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
# the error codes a Response's ``error.code`` may carry (the SDK's list); a pool code maps to server_error
_ERROR_CODES = frozenset({"server_error", "rate_limit_exceeded", "invalid_prompt"})


class ShapeError(Exception):
    """A request the translation cannot carry: ``message`` for the consumer, ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --- the request ------------------------------------------------------------------------------


class FormatText(msgspec.Struct, tag_field="type", tag="text"):
    pass


class FormatJsonObject(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


class FormatJsonSchema(msgspec.Struct, tag_field="type", tag="json_schema"):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct):
    format: FormatText | FormatJsonObject | FormatJsonSchema | None = None


class NamedFunction(msgspec.Struct):
    type: Literal["function"]
    name: str


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """The body of ``POST /v1/responses``, as far as the pool reads it; other fields are ignored.
    ``input`` items and ``tools`` stay plain objects here so that :func:`to_chat` can name the
    offending item (``input[3].type``) when it refuses one."""

    model: ModelName
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: Annotated[list[dict[str, Any]], Meta(max_length=128)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    stream: bool = False
    text: TextConfig | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)] | None = None
    user: str | None = None
    store: bool | None = None  # accepted; nothing is stored either way
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None
    provider: ProviderPreferences | None = None
    reasoning: dict[str, Any] | None = None  # ignored
    truncation: Literal["auto", "disabled"] | None = None  # ignored: the chat path refuses what does not fit
    include: list[str] | None = None  # ignored


class _MessageItem(msgspec.Struct):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]


class _FunctionCallItem(msgspec.Struct):
    call_id: Annotated[str, Meta(min_length=1)]
    name: str
    arguments: str


class _FunctionCallOutputItem(msgspec.Struct):
    call_id: Annotated[str, Meta(min_length=1)]
    output: str | list[dict[str, Any]]


class _TextPart(msgspec.Struct):
    text: str


class _RefusalPart(msgspec.Struct):
    refusal: str


class _ImagePart(msgspec.Struct):
    image_url: str | None = None
    detail: str | None = None


def _convert(obj: Any, typ: type[T], where: str) -> T:
    """``obj`` as ``typ``, or a ShapeError naming the field at fault from ``where`` on."""
    try:
        return msgspec.convert(obj, typ)
    except msgspec.ValidationError as exc:
        text, _, path = str(exc).partition(" - at `$")
        param = where + path.rstrip("`")
        raise ShapeError(f"{text} - at `{param}`", param) from None


def _drop_none(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None}


def _function_tools(tools: list[dict[str, Any]] | None) -> list[FunctionDefinition]:
    """The request's tools, all of which must be functions (the only kind a chat backend runs)."""
    found = []
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise ShapeError(
                f"Tool type {tool.get('type')!r:.80} is not supported: only function tools are.", f"tools[{i}].type"
            )
        found.append(_convert(tool, FunctionDefinition, f"tools[{i}]"))
    return found


def _parts(parts: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Responses content parts as chat content parts."""
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        kind, at = part.get("type"), f"{where}[{j}]"
        if kind in ("input_text", "output_text"):
            out.append({"type": "text", "text": _convert(part, _TextPart, at).text})
        elif kind == "refusal":
            out.append({"type": "text", "text": _convert(part, _RefusalPart, at).refusal})
        elif kind == "input_image":
            image = _convert(part, _ImagePart, at)
            if not image.image_url:
                raise ShapeError(
                    "An input_image needs an image_url (a data: URL); file_id is not supported.", f"{at}.image_url"
                )
            url = {"url": image.image_url} | (
                {"detail": image.detail} if image.detail in ("auto", "low", "high") else {}
            )
            out.append({"type": "image_url", "image_url": url})
        else:
            raise ShapeError(f"Content part type {kind!r:.80} is not supported.", f"{at}.type")
    return out


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as chat messages; consecutive function calls join the assistant message before them."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind, where = item.get("type", "message"), f"input[{i}]"
        if kind == "message":
            msg = _convert(item, _MessageItem, where)
            content = msg.content if isinstance(msg.content, str) else _parts(msg.content, f"{where}.content")
            # open models' chat templates know system, not developer
            out.append({"role": "system" if msg.role == "developer" else msg.role, "content": content})
        elif kind == "function_call":
            fc = _convert(item, _FunctionCallItem, where)
            call = {"id": fc.call_id, "type": "function", "function": {"name": fc.name, "arguments": fc.arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            result = _convert(item, _FunctionCallOutputItem, where)
            output = result.output if isinstance(result.output, str) else _parts(result.output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": result.call_id, "content": output})
        else:
            raise ShapeError(
                f"Input item type {kind!r:.80} is not supported: send message, function_call and "
                "function_call_output items.",
                f"{where}.type",
            )
    return out


def _schema(fmt: FormatJsonSchema) -> dict[str, Any]:
    return _drop_none({"name": fmt.name, "schema": fmt.schema, "description": fmt.description, "strict": fmt.strict})


def _refuse_unsupported(req: ResponsesRequest) -> None:
    if req.previous_response_id is not None:
        raise ShapeError(
            "previous_response_id is not supported: this pool does not store responses; send the whole "
            "conversation in `input`.",
            "previous_response_id",
        )
    if req.conversation is not None:
        raise ShapeError("conversation is not supported: send the whole conversation in `input`.", "conversation")
    if req.prompt is not None:
        raise ShapeError("Stored prompts are not supported: send the text in `instructions` and `input`.", "prompt")
    if req.background:
        raise ShapeError("background is not supported: this pool does not store responses.", "background")
    if not req.input:
        raise ShapeError("input is required: a string or a list of items.", "input")


def to_chat(req: ResponsesRequest) -> dict[str, Any]:
    """The chat-completions body that runs ``req``; raises :class:`ShapeError` on what cannot be carried."""
    _refuse_unsupported(req)
    assert req.input is not None
    tools = _function_tools(req.tools)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    body: dict[str, Any] = {"model": req.model, "messages": system + _messages(req.input), "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if tools:
        body["tools"] = [{"type": "function", "function": _drop_none(msgspec.to_builtins(t))} for t in tools]
    if isinstance(req.tool_choice, NamedFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    fmt = req.text.format if req.text else None
    if isinstance(fmt, FormatJsonObject):
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, FormatJsonSchema):
        body["response_format"] = {"type": "json_schema", "json_schema": _schema(fmt)}
    provider = _drop_none(msgspec.to_builtins(req.provider)) if req.provider else None
    extra = {
        "parallel_tool_calls": req.parallel_tool_calls,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "metadata": req.metadata,
        "user": req.user,
        "provider": provider,
    }
    return body | _drop_none(extra)


# --- the reply --------------------------------------------------------------------------------


class _Details(msgspec.Struct):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _UsageView(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None


class _FunctionView(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallView(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _FunctionView | None = None


class _MessageView(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallView] | None = None


class _ChoiceView(msgspec.Struct):
    index: int = 0
    message: _MessageView | None = None
    delta: _MessageView | None = None
    finish_reason: str | None = None


class _ChatView(msgspec.Struct):
    """A chat completion or chunk, as far as a Response needs it."""

    model: str | None = None
    choices: list[_ChoiceView] = []
    usage: _UsageView | None = None
    x_pool: Any = None


def _usage(u: _UsageView | None) -> dict[str, Any] | None:
    if u is None:
        return None
    cached = (u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else None) or 0
    reasoning = (u.completion_tokens_details.reasoning_tokens if u.completion_tokens_details else None) or 0
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": u.total_tokens if u.total_tokens is not None else u.prompt_tokens + u.completion_tokens,
    }


def _item_id(prefix: str, response_id: str, n: int) -> str:
    """The n-th item id of a kind, derived from the response id (``resp_x`` → ``msg_x``, ``msg_x_1``…)."""
    base = f"{prefix}_{response_id.removeprefix('resp_')}"
    return base if n == 0 else f"{base}_{n}"


def _message_item(item_id: str, text: str | None, status: Status) -> dict[str, Any]:
    """An assistant message item; ``text=None`` gives it no content part yet (as first announced)."""
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: Status) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _echo(req: ResponsesRequest) -> dict[str, Any]:
    """The request settings a Response repeats (the SDK requires several of them)."""
    fmt = req.text.format if req.text else None
    if isinstance(fmt, FormatJsonSchema):
        shown = {"type": "json_schema", **_schema(fmt)}
    else:
        shown = {"type": "json_object" if isinstance(fmt, FormatJsonObject) else "text"}
    choice = req.tool_choice or "auto"
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": None,
        "temperature": req.temperature,
        "text": {"format": shown},
        "tool_choice": msgspec.to_builtins(choice),
        "tools": [{"type": "function", **_drop_none(msgspec.to_builtins(t))} for t in _function_tools(req.tools)],
        "top_p": req.top_p,
        "truncation": "disabled",
        "user": req.user,
    }


def _response(
    req: ResponsesRequest,
    response_id: str,
    created_at: int,
    model: str,
    status: Status,
    output: list[dict[str, Any]],
    **more: Any,
) -> dict[str, Any]:
    """A Response object; ``more`` gives ``usage``, ``error``, ``incomplete_details``, ``x_pool``."""
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
        "output": output,
        "error": more.get("error"),
        "incomplete_details": more.get("incomplete_details"),
        "usage": more.get("usage"),
        **_echo(req),
    }
    if more.get("x_pool") is not None:
        body["x_pool"] = more["x_pool"]
    return body


def _ending(finish_reason: str | None) -> tuple[Status, dict[str, str] | None]:
    """The status a chat finish_reason gives a Response, and why it is incomplete if it is."""
    reason = _INCOMPLETE.get(finish_reason or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def from_chat(chat: dict[str, Any], req: ResponsesRequest, *, response_id: str, created_at: int) -> dict[str, Any]:
    """The Response object for a whole chat completion (raises msgspec.ValidationError if it is not one)."""
    view = msgspec.convert(chat, _ChatView)
    choice = view.choices[0] if view.choices else _ChoiceView()
    msg = choice.message or _MessageView()
    calls = msg.tool_calls or []
    output = (
        [_message_item(_item_id("msg", response_id, 0), msg.content or "", "completed")]
        if msg.content or not calls
        else []
    )
    for k, call in enumerate(calls):
        fn = call.function or _FunctionView()
        call_id = call.id or _item_id("call", response_id, k)
        output.append(
            _call_item(_item_id("fc", response_id, k), call_id, fn.name or "", fn.arguments or "", "completed")
        )
    status, incomplete = _ending(choice.finish_reason)
    if incomplete:
        output[-1]["status"] = "incomplete"
    more = {"usage": _usage(view.usage), "incomplete_details": incomplete, "x_pool": view.x_pool}
    return _response(req, response_id, created_at, view.model or req.model, status, output, **more)


# --- streaming --------------------------------------------------------------------------------


@dataclass
class _Item:
    """An output item being streamed: a message (text) or a function call (arguments)."""

    id: str
    index: int  # output_index
    call_id: str | None = None  # None for a message
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    announced: bool = False  # output_item.added sent (a call waits for its name)
    status: Status = "in_progress"

    def at(self) -> dict[str, Any]:
        """Where events about the item point."""
        return {"item_id": self.id, "output_index": self.index}

    def output(self, text: bool = True) -> dict[str, Any]:
        joined = "".join(self.pieces)
        if self.call_id is None:
            return _message_item(self.id, joined if text else None, self.status)
        return _call_item(self.id, self.call_id, self.name, joined if text else "", self.status)


class ResponseStream:
    """Chat chunks in, Responses SSE events out. Each method returns the events to send, framed
    (``event: …\\ndata: …\\n\\n``), numbered by ``sequence_number`` from 0 across the stream."""

    def __init__(self, req: ResponsesRequest, *, response_id: str, created_at: int, model: str) -> None:
        self.req, self.response_id, self.created_at, self.model = req, response_id, created_at, model
        self._seq = 0
        self._items: list[_Item] = []
        self._message: _Item | None = None  # the open message, if any
        self._calls: dict[int, _Item] = {}  # by the chat's tool call index
        self._finish: str | None = None
        self._usage: _UsageView | None = None
        self._x_pool: Any = None
        self._ended = False

    def _event(self, kind: str, **data: Any) -> bytes:
        body = msgspec.json.encode({"type": kind, "sequence_number": self._seq, **data})
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + body + b"\n\n"

    def _snapshot(self, status: Status, **more: Any) -> dict[str, Any]:
        output = [item.output() for item in self._items if item.announced]
        more |= {"usage": _usage(self._usage) if status != "in_progress" else None, "x_pool": self._x_pool}
        return _response(self.req, self.response_id, self.created_at, self.model, status, output, **more)

    def start(self) -> list[bytes]:
        """``response.created`` and ``response.in_progress``."""
        response = self._snapshot("in_progress")
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        """The events for one chat chunk; a chunk that is not one is skipped."""
        if self._ended:
            return []
        try:
            view = msgspec.convert(chunk, _ChatView)
        except msgspec.ValidationError:
            return []
        self._usage = view.usage or self._usage
        self._x_pool = view.x_pool if view.x_pool is not None else self._x_pool
        out: list[bytes] = []
        for choice in view.choices:
            if choice.index != 0:
                continue
            delta = choice.delta or _MessageView()
            if delta.content:
                out += self._text(delta.content)
            for call in delta.tool_calls or []:
                out += self._call(call)
            self._finish = choice.finish_reason or self._finish
        return out

    def _open(self, call_id: str | None = None) -> _Item:
        kind = "msg" if call_id is None else "fc"
        n = sum(1 for item in self._items if (item.call_id is None) == (call_id is None))
        item = _Item(_item_id(kind, self.response_id, n), len(self._items), call_id)
        self._items.append(item)
        return item

    def _announce(self, item: _Item) -> list[bytes]:
        item.announced = True
        out = [self._event("response.output_item.added", output_index=item.index, item=item.output(text=False))]
        if item.call_id is None:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self._event("response.content_part.added", **item.at(), content_index=0, part=part))
        elif item.pieces:
            out.append(self._event("response.function_call_arguments.delta", **item.at(), delta="".join(item.pieces)))
        return out

    def _text(self, piece: str) -> list[bytes]:
        out: list[bytes] = []
        for call in self._calls.values():  # items stream one at a time: text after a call closes it
            out += self._close(call, "completed")
        if self._message is None:
            self._message = self._open()
            out += self._announce(self._message)
        item = self._message
        item.pieces.append(piece)
        delta = {"content_index": 0, "delta": piece, "logprobs": []}
        return [*out, self._event("response.output_text.delta", **item.at(), **delta)]

    def _call(self, delta: _ToolCallView) -> list[bytes]:
        out = self._close(self._message, "completed") if self._message else []
        item = self._calls.get(delta.index)
        if item is not None and item.status != "in_progress":
            return out  # a call once closed takes no more arguments (another item began after it)
        if item is None:
            for other in self._calls.values():  # a new call closes the one before
                out += self._close(other, "completed")
            n = len(self._calls)
            item = self._calls[delta.index] = self._open(delta.id or _item_id("call", self.response_id, n))
        fn, was = delta.function or _FunctionView(), item.announced
        item.name = item.name or fn.name or ""
        if fn.arguments:
            item.pieces.append(fn.arguments)
        if was and fn.arguments:
            out.append(self._event("response.function_call_arguments.delta", **item.at(), delta=fn.arguments))
        elif not was and item.name:
            out += self._announce(item)
        return out

    def _close(self, item: _Item, status: Status) -> list[bytes]:
        """The events that end an open item."""
        if item.status != "in_progress":
            return []
        out = [] if item.announced else self._announce(item)
        item.status, text, at = status, "".join(item.pieces), item.at()
        if item.call_id is None:
            self._message = None
            part = item.output()["content"][0]
            out.append(self._event("response.output_text.done", **at, content_index=0, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", **at, content_index=0, part=part))
        else:
            out.append(self._event("response.function_call_arguments.done", **at, arguments=text))
        out.append(self._event("response.output_item.done", output_index=item.index, item=item.output()))
        return out

    def finish(self) -> list[bytes]:
        """Closes what is open and sends ``response.completed`` (``response.incomplete`` when cut short)."""
        if self._ended:
            return []
        self._ended = True
        status, incomplete = _ending(self._finish)
        if not self._items:  # an empty reply still has its (empty) message, as from_chat gives
            self._message = self._open()
        out: list[bytes] = []
        for item in self._items:
            last = item is self._items[-1]
            out += self._close(item, "incomplete" if incomplete and last else "completed")
        response = self._snapshot(status, incomplete_details=incomplete)
        return [*out, self._event(f"response.{status}", response=response)]

    def fail(self, code: str, message: str) -> list[bytes]:
        """``response.failed``: the job ended before its reply did. A code the SDK does not know goes
        as ``server_error``, the pool's own kept in ``error.type``."""
        if self._ended:
            return []
        self._ended = True
        for item in self._items:
            item.status = "incomplete" if item.status == "in_progress" else item.status
        error = (
            {"code": code, "message": message}
            if code in _ERROR_CODES
            else {"code": "server_error", "message": message, "type": code}
        )
        return [self._event("response.failed", response=self._snapshot("failed", error=error))]
