"""A cheating backend on loopback: it swaps the model for every request it does not take for a canary.

``python -m tests.detector --port P --canary URL --other URL``

It forwards ``/v1/chat/completions`` to ``--canary`` (the model the agent claims) when the request
looks like a verification job, else to ``--other`` (a cheaper model), and logs each decision, served
back at ``GET /_log`` (``[{"prompt", "reasons"}]``), so a test can count what it flagged. What it
looks for, each cheap to check on every request:

- ``old``: the old canaries' fingerprint: max_tokens 24, seed 7, temperature 0, stream true;
- ``old_order``: the old canaries' keys in their order;
- ``shipped``: a prompt from the canary prompts shipped with the coordinator (they are public);
- ``cap``: a limit of exactly the canary cap (64), what a whole-reply canary's limit is lowered to.
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx
import msgspec
import uvicorn

from coordinator.trust import canaries

OLD_ORDER = ["messages", "model", "max_tokens", "seed", "stream", "temperature"]
SHIPPED = frozenset(canaries.shipped())


def fingerprints(body: dict[str, Any]) -> list[str]:
    """Why ``body`` looks like a canary (nothing: a consumer's, as far as this detector can tell)."""
    reasons = []
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if limit == 24 and body.get("seed") == 7 and body.get("temperature") == 0 and body.get("stream") is True:
        reasons.append("old")
    if [key for key in body if key != "stream_options"] == OLD_ORDER:  # the agent adds stream_options
        reasons.append("old_order")
    if prompt_of(body) in SHIPPED:
        reasons.append("shipped")
    if limit == canaries.CAP:
        reasons.append("cap")
    return reasons


def prompt_of(body: dict[str, Any]) -> str:
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content")
    return content if isinstance(content, str) else ""


class Detector:
    def __init__(self, canary: str, other: str) -> None:
        self.canary = canary.rstrip("/")
        self.other = other.rstrip("/")
        self.log: list[dict[str, Any]] = []
        self.client = httpx.AsyncClient(timeout=300)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/_log":
            await self._reply(send, 200, msgspec.json.encode(self.log))
        elif scope["path"] == "/v1/models":
            await self._reply(send, 200, b'{"object":"list","data":[{"id":"local-model","object":"model"}]}')
        elif scope["path"] == "/v1/chat/completions":
            await self._forward(body, send)
        else:
            await self._reply(send, 404, b'{"error":{"message":"not found"}}')

    async def _forward(self, body: bytes, send: Any) -> None:
        request = msgspec.json.decode(body)
        reasons = fingerprints(request)
        self.log.append({"prompt": prompt_of(request), "reasons": reasons})
        target = self.canary if reasons else self.other
        headers = {"content-type": "application/json"}
        async with self.client.stream("POST", f"{target}/v1/chat/completions", content=body, headers=headers) as up:
            kind = up.headers.get("content-type", "application/json").encode()
            await send({"type": "http.response.start", "status": up.status_code, "headers": [(b"content-type", kind)]})
            async for piece in up.aiter_raw():
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _reply(self, send: Any, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--canary", required=True, help="the claimed model's server, for what looks like a canary")
    parser.add_argument("--other", required=True, help="the swapped-in model's server, for everything else")
    args = parser.parse_args()
    app = Detector(args.canary, args.other)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
