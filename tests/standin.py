"""A fast OpenAI-compatible stand-in on loopback, for what is external and paid (the platform upstream)
and for benchmarks that need a backend faster than any model.

``python -m tests.standin --port P [--chunks N] [--interval-ms MS] [--mode MODE]``

Modes: ``ok``; ``fail`` (500s) and ``hang`` (never answers); and the cheats the pool must catch:
``inflate`` (reports twice the completion tokens it sends), ``garbage`` (one token repeated),
``stall`` (goes silent after its first chunk).

It answers ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (stream or not, usage as
OpenAI reports it; a chat request with tools whose last message is not a tool's result calls its
first tool with ``TOOL_ARGUMENTS``) and ``/v1/embeddings`` (``--dims`` numbers per input, the same for the same input:
a unit vector drawn from its hash); ``--kinds`` narrows which of the three it serves (the others are
404, as a server without them). It remembers the last request body, served back at ``GET /_last``,
and counts requests per path at ``GET /_counts``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import random
import time
from typing import Any

import msgspec
import uvicorn

_json = msgspec.json.Encoder()


TOOL_CALL_ID = "call_standin_1"
TOOL_ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'  # what the stand-in calls a request's first tool with
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embedding": "/v1/embeddings"}


def vector(item: object, dims: int) -> list[float]:
    """The stand-in's embedding of one input: a unit vector seeded by its hash."""
    rng = random.Random(hashlib.sha256(_json.encode(item)).digest())
    values = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


class Standin:
    def __init__(
        self, chunks: int, interval_ms: float, mode: str, kinds: tuple[str, ...] = tuple(PATHS), dims: int = 8
    ) -> None:
        self.chunks = chunks
        self.interval = interval_ms / 1000
        self.mode = mode
        self.paths = {PATHS[kind] for kind in kinds}
        self.dims = dims
        self.last: bytes = b"{}"
        self.requests = 0
        self.counts: dict[str, int] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/v1/models":
            await self._json(send, 200, {"object": "list", "data": [{"id": "standin", "object": "model"}]})
        elif path == "/_last":
            await self._raw(send, 200, self.last)
        elif path == "/_counts":
            await self._json(send, 200, self.counts)
        elif path in self.paths:
            self.last = body
            self.requests += 1
            self.counts[path] = self.counts.get(path, 0) + 1
            if path == PATHS["embedding"]:
                await self._embed(body, send)
            else:
                await self._chat(body, send, text=path == PATHS["completion"])
        else:
            await self._json(send, 404, {"error": {"message": "not found"}})

    async def _embed(self, body: bytes, send: Any) -> None:
        if self.mode in ("fail", "hang"):
            await self._chat(body, send)  # fails or hangs alike
            return
        request = msgspec.json.decode(body)
        given = request.get("input")
        items = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else given
        tokens = sum(len(item) if isinstance(item, list) else len(item.split()) for item in items)
        data = [
            {"object": "embedding", "index": i, "embedding": vector(item, self.dims)} for i, item in enumerate(items)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        await self._json(send, 200, {"object": "list", "data": data, "model": request.get("model"), "usage": usage})

    async def _chat(self, body: bytes, send: Any, text: bool = False) -> None:
        """A chat completion, or with ``text`` a text completion (``choices[].text``)."""
        if self.mode == "fail":
            await self._json(send, 500, {"error": {"message": "stand-in failure"}})
            return
        if self.mode == "hang":
            await asyncio.sleep(3600)
        request = msgspec.json.decode(body)
        model = request.get("model", "standin")
        created = int(time.time())
        messages = request.get("messages") or [{}]
        if not text and request.get("tools") and messages[-1].get("role") != "tool":
            await self._tool_call(request, send, model, created)
            return
        completion = self.chunks * (2 if self.mode == "inflate" else 1)
        usage = {"prompt_tokens": 5, "completion_tokens": completion, "total_tokens": 5 + completion}
        if not request.get("stream"):
            if self.interval:  # as long as the tokens the request allows would take (a probe asks one)
                allowed = request.get("max_tokens") or request.get("max_completion_tokens") or self.chunks
                await asyncio.sleep(self.interval * min(self.chunks, allowed))
            content = " ".join(self._token(i) for i in range(self.chunks))
            choice: dict[str, object] = (
                {"index": 0, "text": content, "logprobs": None, "finish_reason": "stop"}
                if text
                else {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            )
            await self._json(
                send,
                200,
                {
                    "id": "cmpl-standin" if text else "chatcmpl-standin",
                    "object": "text_completion" if text else "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                },
            )
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        kind = "text_completion" if text else "chat.completion.chunk"
        base = {
            "id": "cmpl-standin" if text else "chatcmpl-standin",
            "object": kind,
            "created": created,
            "model": model,
        }
        for i in range(self.chunks):
            if text:
                piece: dict[str, object] = {"index": 0, "text": f"{self._token(i)} ", "finish_reason": None}
            else:
                delta = {"content": f"{self._token(i)} "}
                piece = {
                    "index": 0,
                    "delta": {"role": "assistant", **delta} if i == 0 else delta,
                    "finish_reason": None,
                }
            chunk = {**base, "choices": [piece]}
            await send(
                {"type": "http.response.body", "body": b"data: " + _json.encode(chunk) + b"\n\n", "more_body": True}
            )
            if self.mode == "stall":
                await asyncio.sleep(3600)
            if self.interval:
                await asyncio.sleep(self.interval)
        last = (
            {"index": 0, "text": "", "finish_reason": "stop"}
            if text
            else {"index": 0, "delta": {}, "finish_reason": "stop"}
        )
        tail = [{**base, "choices": [last]}]
        if (request.get("stream_options") or {}).get("include_usage"):
            tail.append({**base, "choices": [], "usage": usage})
        out = b"".join(b"data: " + _json.encode(c) + b"\n\n" for c in tail) + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": out, "more_body": False})

    async def _tool_call(self, request: dict[str, Any], send: Any, model: str, created: int) -> None:
        """Call the request's first tool with ``TOOL_ARGUMENTS`` (streamed in two pieces), as a
        model that decides to call a tool does; the conversation's next turn, with the tool's
        result, gets text."""
        name = request["tools"][0]["function"]["name"]
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        call = {"id": TOOL_CALL_ID, "type": "function", "function": {"name": name, "arguments": TOOL_ARGUMENTS}}
        base = {"id": "chatcmpl-standin", "created": created, "model": model}
        if not request.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            await self._json(send, 200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage})
            return
        half = len(TOOL_ARGUMENTS) // 2
        opening = {**call, "index": 0, "function": {"name": name, "arguments": TOOL_ARGUMENTS[:half]}}
        deltas = [
            {"role": "assistant", "content": None, "tool_calls": [opening]},
            {"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGUMENTS[half:]}}]},
        ]
        chunks = [{"index": 0, "delta": delta, "finish_reason": None} for delta in deltas]
        chunks.append({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
        events = [{**base, "object": "chat.completion.chunk", "choices": [choice]} for choice in chunks]
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        out = b"".join(b"data: " + _json.encode(event) + b"\n\n" for event in events) + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": out, "more_body": False})

    def _token(self, i: int) -> str:
        return "zzz" if self.mode == "garbage" else f"tok{i}"

    async def _json(self, send: Any, status: int, payload: object) -> None:
        await self._raw(send, status, _json.encode(payload))

    async def _raw(self, send: Any, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--mode", choices=["ok", "fail", "hang", "inflate", "garbage", "stall"], default="ok")
    parser.add_argument("--kinds", default=",".join(PATHS), help="which of chat, completion, embedding it serves")
    parser.add_argument("--dims", type=int, default=8, help="numbers in each embedding")
    args = parser.parse_args()
    kinds = tuple(kind for kind in args.kinds.split(",") if kind)
    app = Standin(args.chunks, args.interval_ms, args.mode, kinds, args.dims)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
