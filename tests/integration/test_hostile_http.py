"""Hostile HTTP clients against a real coordinator: bodies built to break decoding (JSON nested
thousands deep, invalid encodings, absurd numbers) get a 400 in the error envelope without a
traceback in the log; slow clients (slowloris headers, dribbled bodies, idle connections) are cut off
at their deadlines while everyone else is served."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import ADMIN_TOKEN, Pool

MODEL = "smollm2-135m"
DEPTH = 1_500  # past the interpreter's recursion limit (1,000), which msgspec's decoder shares


def deep_list(depth: int = DEPTH) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int = DEPTH) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def in_field(depth: int = DEPTH) -> bytes:
    """A valid chat request whose tool parameters (a free-form JSON object) nest ``depth`` deep."""
    parameters = deep_object(depth).decode()
    tools = f'[{{"type": "function", "function": {{"name": "f", "parameters": {parameters}}}}}]'
    return f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "tools": {tools}}}'.encode()


HOSTILE = {
    "deep list": deep_list(),
    "deep object": deep_object(),
    "deep in a field": in_field(),
    "unclosed, 100,000 deep": b"[" * 100_000,
    "invalid UTF-8": b'{"email": "\xff\xfe@example.com", "password": "long enough"}',
    "lone surrogate": b'{"email": "\\ud800@example.com", "password": "long enough \\udfff"}',
    "huge integer": b'{"email": "a@example.com", "password": "long enough", "x": ' + b"9" * 5_000 + b"}",
    "huge exponent": b'{"amountUsd": 1e999999, "userId": 1}',
    "truncated": b'{"email": "a@example.com", "pass',
    "not JSON": b"\x00\x01\x02 binary",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    harness = Pool(tmp_path_factory.mktemp("hostile"), header_timeout="1", body_timeout="2")
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def log_of(pool: Pool) -> str:
    assert pool.coordinator is not None
    return pool.coordinator.output()


def post(pool: Pool, path: str, body: bytes, auth: str | None = None, **headers: str) -> httpx.Response:
    sent = {"content-type": "application/json", **headers}
    if auth:
        sent["authorization"] = f"Bearer {auth}"
    return httpx.post(f"{pool.url}{path}", content=body, headers=sent, timeout=30)


def assert_invalid_request(response: httpx.Response, what: str) -> None:
    assert response.status_code == 400, (what, response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}, (what, body)
    assert body["error"]["code"] == "invalid_request" and body["error"]["message"], (what, body)


def test_bodies_that_break_decoding_are_400_everywhere_without_a_traceback(hostile: Pool) -> None:
    pool = hostile
    session = pool.sign_up(f"deep-{uuid.uuid4().hex[:8]}@example.com", "long enough password")["token"]
    endpoints: list[tuple[str, str | None, dict[str, str]]] = [
        ("/v1/auth/signup", None, {}),
        ("/v1/auth/login", None, {}),
        ("/v1/chat/completions", pool.key, {}),
        ("/v1/tokens", session, {}),
        ("/v1/agent-tokens", session, {}),
        ("/v1/admin/credits", ADMIN_TOKEN, {"idempotency-key": "deep"}),
    ]
    before = log_of(pool)
    requests = 0
    for path, auth, headers in endpoints:
        for name, body in HOSTILE.items():
            requests += 1
            assert_invalid_request(post(pool, path, body, auth, **headers), f"{path}: {name}")
    # the portal's forms: whatever the body, never a server error
    for body, content_type in [
        (b"csrf=%ff%fe&email=\xff\xfe&password=" + b"%" * 1000, "application/x-www-form-urlencoded"),
        (b"--x\r\nnot a part", "multipart/form-data; boundary=x"),
        (b"garbage", "multipart/form-data"),
    ]:
        for path in ("/portal/login", "/portal/signup", "/portal/keys"):
            requests += 1
            response = httpx.post(f"{pool.url}{path}", content=body, headers={"content-type": content_type}, timeout=30)
            assert response.status_code < 500, (path, body, response.status_code, response.text[:300])

    assert httpx.get(f"{pool.url}/healthz", timeout=5).status_code == 200
    new = log_of(pool)[len(before) :]
    assert "Traceback" not in new and '"exc"' not in new and "RecursionError" not in new, new[-3000:]
    lines = [line for line in new.splitlines() if line.strip()]
    assert len(lines) <= requests, lines[-20:]  # at most one line per refused request
    assert all(len(line) < 500 for line in lines), max(lines, key=len)
    # nothing was created by the refused requests
    listed = httpx.get(f"{pool.url}/v1/tokens", headers={"authorization": f"Bearer {session}"}, timeout=10)
    assert listed.json()["data"] == []


# --- slow clients --------------------------------------------------------------------------------

HEADER_TIMEOUT, BODY_TIMEOUT, SLACK = 1.0, 2.0, 1.5
DRIBBLE = 0.2  # seconds between the bytes a slow client sends


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Wait for the server to close the connection (EOF or reset); ``False`` if it stayed open."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except TimeoutError:  # (an OSError: first)
        return False
    except OSError:  # reset
        return True
    return True


async def _dribble(writer: asyncio.StreamWriter, piece: bytes) -> None:
    try:
        while True:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(DRIBBLE)
    except OSError:
        pass


async def slow_client(port: int, start: bytes, piece: bytes, first: bytes = b"") -> tuple[float, bool]:
    """Open a connection, send ``first`` (a whole request, answered), then ``start`` and ``piece``
    after ``piece`` forever; return how long the server took, from ``start``, to close it.

    Without ``first`` the clock starts before connecting: the server's starts when it accepts, and
    among fifty clients this one may resume from its connect a few tenths of a second later."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if first:
            writer.write(first)
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.read(65536)  # the answer's body
            began = loop.time()
        writer.write(start)
        dribbler = asyncio.create_task(_dribble(writer, piece)) if piece else None
        closed = await _closed(reader, 15)
        elapsed = loop.time() - began
        if dribbler is not None:
            dribbler.cancel()
        return elapsed, closed
    finally:
        writer.close()


async def _flood(port: int, url: str) -> dict[str, Any]:
    healthz: list[float] = []
    stop = asyncio.Event()

    async def poll() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while not stop.is_set():
                began = time.monotonic()
                assert (await client.get(f"{url}/healthz")).status_code == 200
                healthz.append(time.monotonic() - began)
                await asyncio.sleep(0.1)

    head = b"POST /v1/auth/login HTTP/1.1\r\nhost: pool\r\ncontent-type: application/json\r\n"
    ping = b"GET /healthz HTTP/1.1\r\nhost: pool\r\n\r\n"
    kinds = {
        "slow headers": [slow_client(port, ping[:-2], b"x-a: b\r\n") for _ in range(50)],
        "idle": [slow_client(port, b"", b"") for _ in range(20)],
        "slow body": [slow_client(port, head + b"content-length: 1000\r\n\r\n{", b" ") for _ in range(30)],
        "slow headers after a request": [slow_client(port, b"GET /he", b"a", first=ping) for _ in range(10)],
    }
    poller = asyncio.create_task(poll())
    everyone = await asyncio.gather(*(client for clients in kinds.values() for client in clients))
    results, at = {}, 0
    for kind, clients in kinds.items():
        results[kind], at = everyone[at : at + len(clients)], at + len(clients)
    stop.set()
    await poller
    return {"results": results, "healthz": healthz}


async def _legit(port: int) -> list[bytes]:
    """Clients slower than usual but within the deadlines: headers in two parts 0.6 s apart, and a
    body in three parts over 1.2 s."""
    answers = []
    body = b'{"email": "nobody@example.com", "password": "not the password"}'
    head = b"POST /v1/auth/login HTTP/1.1\r\nhost: pool\r\ncontent-length: %d\r\n\r\n" % len(body)
    for parts in (
        [b"GET /healthz HTTP/1.1\r\nhost: pool\r\n", b"accept: */*\r\n\r\n"],
        [head, body[:20], body[20:]],
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.6)
        answers.append(await asyncio.wait_for(reader.readuntil(b"\r\n"), 5))
        writer.close()
    return answers


def test_slow_clients_are_cut_off_at_their_deadlines_and_others_are_served(hostile: Pool) -> None:
    pool = hostile
    pool.agent(pool.standin(chunks=8, interval_ms=400), [f"{MODEL}=standin-model"])
    before = log_of(pool)

    async def scenario() -> tuple[dict[str, Any], list[bytes], httpx.Response]:
        # a stream that lasts longer than both deadlines, running through the flood
        async with httpx.AsyncClient(timeout=30) as client:
            stream = asyncio.create_task(
                client.post(
                    f"{pool.url}/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
                    headers={"authorization": f"Bearer {pool.key}"},
                )
            )
            flood = await _flood(pool.port, pool.url)
            legit = await _legit(pool.port)
            return flood, legit, await stream

    flood, legit, stream = asyncio.run(scenario())
    results: dict[str, list[tuple[float, bool]]] = flood["results"]
    for kind, deadline in [
        ("slow headers", HEADER_TIMEOUT),
        ("idle", HEADER_TIMEOUT),
        ("slow headers after a request", HEADER_TIMEOUT),
        ("slow body", BODY_TIMEOUT),
    ]:
        times = [elapsed for elapsed, closed in results[kind]]
        assert all(closed for _, closed in results[kind]), (kind, results[kind])
        assert deadline - 0.2 <= min(times) and max(times) <= deadline + SLACK, (kind, min(times), max(times))
    assert flood["healthz"] and max(flood["healthz"]) < 1.0, max(flood["healthz"])
    assert [answer.split(b" ")[1] for answer in legit] == [b"200", b"401"]  # served, not cut off

    assert stream.status_code == 200 and stream.text.count("tok") == 8 and stream.text.endswith("[DONE]\n\n")
    assert pool.agent_count() == 1  # the agent's websocket outlived both deadlines
    new = log_of(pool)[len(before) :]
    assert "Traceback" not in new and '"exc"' not in new, new[-3000:]
