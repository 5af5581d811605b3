"""Hostile HTTP clients against a real coordinator: bodies built to break decoding (JSON nested
thousands deep, invalid encodings, absurd numbers) get a 400 in the error envelope without a
traceback in the log."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

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
    harness = Pool(tmp_path_factory.mktemp("hostile"))
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

