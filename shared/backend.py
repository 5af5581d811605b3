"""One OpenAI-compatible client, used by the agent (its local backend) and by the coordinator (the
platform upstream), so both produce the same stream of events, for every job kind (chat,
completions and embeddings answer in shapes alike enough: ``choices`` with finish reasons, ``usage``).

It runs on aiohttp: on the agent, relaying a request costs about a third of the CPU it took with
httpx, whose per-request plumbing was most of the agent's work (``tests/bench/throughput.py``).

:func:`run_chat` yields :class:`Chunk` for each piece of output, then exactly one :class:`Done` or
:class:`Failure`. Streams are passed through as the backend's JSON payloads, read only far enough
(:class:`~shared.openai.ChunkView`) to find usage, finish reasons and in-band errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from shared import errors
from shared.openai import ChunkView, ErrorBodyView
from shared.protocol import CHAT, COMPLETION, EMBEDDING, Usage

# Where each job kind runs on an OpenAI-compatible server, under its ``/v1``.
ENDPOINTS = {CHAT: "/chat/completions", COMPLETION: "/completions", EMBEDDING: "/embeddings"}


class Chunk(msgspec.Struct):
    data: bytes


class Done(msgspec.Struct):
    usage: Usage | None
    finish_reason: str | None
    tail: list[bytes]


class Failure(msgspec.Struct):
    code: str
    message: str
    retryable: bool
    status: int | None = None


Event = Chunk | Done | Failure

_chunk_decoder = msgspec.json.Decoder(ChunkView)
_error_decoder = msgspec.json.Decoder(ErrorBodyView)
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_json = msgspec.json.Encoder()


def prepare_body(raw: bytes, backend_model: str, stream: bool) -> bytes:
    """Rewrite a consumer body for a backend: its own model name, and usage always reported."""
    body = _dict_decoder.decode(raw)
    body["model"] = backend_model
    if stream:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return _json.encode(body)


class SSEParser:
    """Incremental Server-Sent-Events parser returning each event's ``data`` payload."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, self._buffer = buffer.split(b"\n\n")
        payloads = []
        for event in events:
            lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                payloads.append(b"\n".join(lines))
        return payloads


def _error_message(body: bytes, status: int) -> str:
    try:
        parsed = _error_decoder.decode(body)
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip()
        return text[:500] or f"HTTP {status}"
    if isinstance(parsed.error, str):
        return parsed.error
    if parsed.error is not None and parsed.error.message:
        return parsed.error.message
    return parsed.message or f"HTTP {status}"


def _failure_for_status(status: int, body: bytes) -> Failure:
    message = _error_message(body, status)
    if status in (408, 429) or status >= 500:
        return Failure(errors.BACKEND_ERROR, f"backend returned {status}: {message}", True, status)
    return Failure(errors.BACKEND_REJECTED, message, False, status)


class HttpClient:
    """A keep-alive connection pool to one OpenAI-compatible server, opened on first use (an aiohttp
    session belongs to the event loop that runs it). ``read_timeout`` bounds each wait for data,
    ``None`` waits as long as the job's own deadline allows."""

    def __init__(self, limit: int, read_timeout: float | None, *, trust_env: bool = False) -> None:
        self.limit = limit
        self.read_timeout = read_timeout
        self.trust_env = trust_env
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self.read_timeout),
                trust_env=self.trust_env,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def run_chat(
    client: HttpClient,
    url: str,
    body: bytes,
    *,
    stream: bool,
    want_usage: bool,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Event]:
    """POST ``body`` to ``url`` and yield the result as events (see module docstring)."""
    request_headers = {"content-type": "application/json", **(headers or {})}
    try:
        async with client.session().post(url, data=body, headers=request_headers) as response:
            if response.status != 200:
                yield _failure_for_status(response.status, await response.read())
                return
            if stream:
                async for event in _relay_stream(response, want_usage):
                    yield event
                return
            content = await response.read()
        try:
            view = _chunk_decoder.decode(content)
        except msgspec.DecodeError as exc:
            yield Failure(errors.BACKEND_ERROR, f"backend sent an invalid response: {exc}", True)
            return
        if view.error is not None:
            yield Failure(errors.BACKEND_ERROR, _error_message(content, 200), True)
            return
        yield Chunk(content)
        finish = view.choices[0].finish_reason if view.choices else None
        yield Done(view.usage, finish, [])
    except TimeoutError as exc:
        yield Failure(errors.BACKEND_ERROR, f"backend timed out: {type(exc).__name__}", True)
    except aiohttp.ClientError as exc:
        yield Failure(errors.BACKEND_UNAVAILABLE, f"backend unreachable: {exc or type(exc).__name__}", True)


async def _relay_stream(response: aiohttp.ClientResponse, want_usage: bool) -> AsyncIterator[Event]:
    parser = SSEParser()
    usage: Usage | None = None
    finish_reason: str | None = None
    held: bytes | None = None  # the latest chunk with a finish reason, kept back for x_pool
    usage_chunk: bytes | None = None
    sent_any = False
    async for data in response.content.iter_any():
        for payload in parser.feed(data):
            if payload == b"[DONE]":
                tail = [c for c in (held, usage_chunk if want_usage else None) if c is not None]
                yield Done(usage, finish_reason, tail)
                return
            try:
                view = _chunk_decoder.decode(payload)
            except msgspec.DecodeError as exc:
                yield Failure(errors.BACKEND_ERROR, f"backend sent an invalid chunk: {exc}", not sent_any)
                return
            if view.error is not None:
                yield Failure(errors.BACKEND_ERROR, _error_message(payload, 200), not sent_any)
                return
            if view.usage is not None:
                usage = view.usage
            if not view.choices:
                if view.usage is not None:
                    usage_chunk = payload
                    continue
            elif any(choice.finish_reason for choice in view.choices):
                finish_reason = next(c.finish_reason for c in view.choices if c.finish_reason)
                if held is not None:
                    yield Chunk(held)
                held = payload
                sent_any = True
                continue
            if held is not None:
                yield Chunk(held)
                held = None
            sent_any = True
            yield Chunk(payload)
    # The backend closed without [DONE]: what arrived is still a complete answer if it finished.
    if finish_reason is not None:
        tail = [c for c in (held, usage_chunk if want_usage else None) if c is not None]
        yield Done(usage, finish_reason, tail)
    else:
        yield Failure(errors.BACKEND_ERROR, "backend closed the stream early", not sent_any)
