"""A fast OpenAI-compatible stand-in on loopback, for what is external and paid (the platform upstream)
and for benchmarks that need a backend faster than any model.

``python -m tests.standin --port P [--chunks N] [--interval-ms MS] [--mode MODE]``

Modes: ``ok``; ``fail`` (500s) and ``hang`` (never answers); and the cheats the pool must catch:
``inflate`` (reports twice the completion tokens it sends), ``garbage`` (one token repeated),
``stall`` (goes silent after its first chunk).

It answers ``/v1/models`` and ``/v1/chat/completions`` (stream or not, usage as OpenAI reports it)
and remembers the last request body, served back at ``GET /_last``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import msgspec
import uvicorn

_json = msgspec.json.Encoder()


class Standin:
    def __init__(self, chunks: int, interval_ms: float, mode: str) -> None:
        self.chunks = chunks
        self.interval = interval_ms / 1000
        self.mode = mode
        self.last: bytes = b"{}"
        self.requests = 0

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
        elif path == "/v1/chat/completions":
            self.last = body
            self.requests += 1
            await self._chat(body, send)
        else:
            await self._json(send, 404, {"error": {"message": "not found"}})

    async def _chat(self, body: bytes, send: Any) -> None:
        if self.mode == "fail":
            await self._json(send, 500, {"error": {"message": "stand-in failure"}})
            return
        if self.mode == "hang":
            await asyncio.sleep(3600)
        request = msgspec.json.decode(body)
        model = request.get("model", "standin")
        created = int(time.time())
        completion = self.chunks * (2 if self.mode == "inflate" else 1)
        usage = {"prompt_tokens": 5, "completion_tokens": completion, "total_tokens": 5 + completion}
        if not request.get("stream"):
            if self.interval:
                await asyncio.sleep(self.interval * self.chunks)
            content = " ".join(self._token(i) for i in range(self.chunks))
            await self._json(
                send,
                200,
                {
                    "id": "chatcmpl-standin",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
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
        base = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": created, "model": model}
        for i in range(self.chunks):
            delta = (
                {"role": "assistant", "content": f"{self._token(i)} "} if i == 0 else {"content": f"{self._token(i)} "}
            )
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await send(
                {"type": "http.response.body", "body": b"data: " + _json.encode(chunk) + b"\n\n", "more_body": True}
            )
            if self.mode == "stall":
                await asyncio.sleep(3600)
            if self.interval:
                await asyncio.sleep(self.interval)
        tail = [{**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        if (request.get("stream_options") or {}).get("include_usage"):
            tail.append({**base, "choices": [], "usage": usage})
        out = b"".join(b"data: " + _json.encode(c) + b"\n\n" for c in tail) + b"data: [DONE]\n\n"
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
    args = parser.parse_args()
    app = Standin(args.chunks, args.interval_ms, args.mode)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
