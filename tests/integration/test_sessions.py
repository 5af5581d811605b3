"""Portal sessions against real coordinator processes: forged, altered and expired JWTs are refused
on a session-only endpoint (GET /v1/tokens); then an external identity provider (JWKS) whose keys
rotate while the coordinator runs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from scripts import localpool
from tests.harness import JWT_SECRET, Pool

ISSUER, AUDIENCE = "provider-pool", "provider-pool-portal"
IDP_ISSUER, IDP_AUDIENCE = "https://idp.example", "pool"
PROTECTED = "/v1/tokens"
SECRET = JWT_SECRET.encode()


def bare_pool(workdir: Path, **settings: str) -> Pool:
    """A coordinator only (no users, keys or tokens made with the admin CLI: a second faster)."""
    harness = Pool(workdir, credits_usd="", **settings)
    harness.coordinator = localpool.start_coordinator(harness.port, harness.env, harness.dir)
    return harness


def b64(data: bytes | dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes] | None = None) -> str:
    """A JWT assembled by hand (for what PyJWT refuses to make), signed by ``sign`` or unsigned."""
    signing_input = f"{b64(header)}.{b64(claims)}".encode()
    return f"{signing_input.decode()}.{b64(sign(signing_input)) if sign else ''}"


def hs(secret: bytes, digest: Any = hashlib.sha256) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, digest).digest()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def auth(token: str, scheme: str = "Bearer") -> dict[str, str]:
    return {"authorization": f"{scheme} {token}".strip()}


def get(pool: Pool, token: str, path: str = PROTECTED, scheme: str = "Bearer") -> httpx.Response:
    return httpx.get(f"{pool.url}{path}", headers=auth(token, scheme), timeout=30)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("invalid_session", "authentication_error"), error


# --- the coordinator's own sessions (HS256 with POOL_JWT_SECRET) --------------------------------


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    # ~60 refused sessions on purpose: allow them (the per-address failure limit is tested in test_portal)
    harness = bare_pool(tmp_path_factory.mktemp("sessions"), auth_failures_per_minute="1000")
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture(scope="module")
def user_id(local: Pool) -> int:
    session = local.sign_up(f"jwt-{uuid.uuid4().hex[:8]}@example.com", "correct horse battery")
    uid: int = session["user"]["id"]
    # something only this user has, to recognise their session by
    created = httpx.post(
        f"{local.url}/v1/tokens",
        json={"displayName": "marker"},
        headers={"authorization": f"Bearer {session['token']}"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    return uid


def claims_for(uid: int, **changes: Any) -> dict[str, Any]:
    """Valid claims for ``uid``; a change to ``None`` removes the claim."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(uid), "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def signed(claims: dict[str, Any], algorithm: str = "HS256", key: Any = JWT_SECRET) -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


ATTACKS: dict[str, Callable[[int], str]] = {
    "alg none": lambda uid: hand_made({"alg": "none", "typ": "JWT"}, claims_for(uid)),
    "alg None": lambda uid: hand_made({"alg": "None", "typ": "JWT"}, claims_for(uid)),
    "alg none with a valid signature kept": lambda uid: (
        hand_made({"alg": "none", "typ": "JWT"}, claims_for(uid)) + signed(claims_for(uid)).rsplit(".", 1)[1]
    ),
    "HS256 signature stripped": lambda uid: signed(claims_for(uid)).rsplit(".", 1)[0] + ".",
    "HS512 with the right secret": lambda uid: signed(claims_for(uid), "HS512"),
    "HS384 with the right secret": lambda uid: signed(claims_for(uid), "HS384"),
    "HS512 hand-made, header says HS256": lambda uid: hand_made(
        {"alg": "HS256", "typ": "JWT"}, claims_for(uid), hs(SECRET, hashlib.sha512)
    ),
    "RS256 with some key": lambda uid: signed(claims_for(uid), "RS256", rsa_key()),
    "missing exp": lambda uid: signed(claims_for(uid, exp=None)),
    "expired exp": lambda uid: signed(claims_for(uid, iat=int(time.time()) - 600, exp=int(time.time()) - 5)),
    "exp not a number": lambda uid: signed(claims_for(uid, exp="tomorrow")),
    "nbf in the future": lambda uid: signed(claims_for(uid, nbf=int(time.time()) + 600)),
    "missing iss": lambda uid: signed(claims_for(uid, iss=None)),
    "wrong iss": lambda uid: signed(claims_for(uid, iss="someone-else")),
    "iss with a trailing space": lambda uid: signed(claims_for(uid, iss="provider-pool ")),
    "iss in another case": lambda uid: signed(claims_for(uid, iss="Provider-Pool")),
    "iss with a suffix": lambda uid: signed(claims_for(uid, iss="provider-pool.evil")),
    "iss a prefix of the real one": lambda uid: signed(claims_for(uid, iss="provider")),
    "iss a list": lambda uid: hand_made({"alg": "HS256", "typ": "JWT"}, claims_for(uid, iss=[ISSUER]), hs(SECRET)),
    "missing aud": lambda uid: signed(claims_for(uid, aud=None)),
    "wrong aud": lambda uid: signed(claims_for(uid, aud="provider-pool-admin")),
    "aud a prefix of the real one": lambda uid: signed(claims_for(uid, aud="provider-pool")),
    "aud list without ours": lambda uid: signed(claims_for(uid, aud=["other", "provider-pool"])),
    "missing sub": lambda uid: signed(claims_for(uid, sub=None)),
    "empty sub": lambda uid: signed(claims_for(uid, sub="")),
    "sub not a user id": lambda uid: signed(claims_for(uid, sub="admin")),
    "sub a number, not a string": lambda uid: signed(claims_for(uid, sub=uid)),
    "wrong secret": lambda uid: signed(claims_for(uid), key=JWT_SECRET + "x"),
    "garbage": lambda uid: "not-a-jwt",
    "garbage with dots": lambda uid: "a.b.c",
    "empty": lambda uid: "",
}


@pytest.mark.filterwarnings("ignore:The HMAC key is")  # PyJWT's advice for HS384/HS512 keys
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_forged_or_invalid_sessions_are_refused(local: Pool, user_id: int, attack: str) -> None:
    token = ATTACKS[attack](user_id)
    assert_refused(get(local, token))
    assert_refused(
        httpx.post(
            f"{local.url}{PROTECTED}",
            json={"displayName": "x"},
            headers=auth(token),
            timeout=30,
        )
    )


def test_a_valid_session_built_with_the_secret_is_accepted(local: Pool, user_id: int) -> None:
    token = signed(claims_for(user_id))
    response = get(local, token)
    assert response.status_code == 200, response.text
    assert [row["displayName"] for row in response.json()["data"]] == ["marker"]  # that user's, by sub
    assert get(local, token, "/v1/credits").status_code == 200
    # only the Bearer scheme carries a session
    assert_refused(get(local, token, scheme="Basic"))
    assert_refused(get(local, token, scheme="Token"))
    # a token for another user sees that user's (empty) list, not this one's
    other = get(local, signed(claims_for(user_id + 1000)))
    assert other.status_code in (200, 401) and "marker" not in other.text


# --- an external identity provider (JWKS), with key rotation ------------------------------------


class Jwks:
    """A loopback JWKS endpoint whose key set can be swapped; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                jwks.fetches += 1
                body = json.dumps({"keys": jwks.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, *keys: tuple[str, rsa.RSAPrivateKey]) -> None:
        self.keys = [public_jwk(kid, key) for kid, key in keys]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def public_jwk(kid: str, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


KEY_A, KEY_B, KEY_C = rsa_key(), rsa_key(), rsa_key()


def idp_claims(subject: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "email": f"{subject.split('|')[-1]}@idp-users.example",
        "iss": IDP_ISSUER,
        "aud": IDP_AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    claims.update(changes)
    return claims


def idp_token(claims: dict[str, Any], kid: str, key: rsa.RSAPrivateKey = KEY_A) -> str:
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def idp() -> Iterator[Jwks]:
    server = Jwks()
    server.serve(("key-a", KEY_A))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def sso(tmp_path_factory: pytest.TempPathFactory, idp: Jwks) -> Iterator[Pool]:
    harness = bare_pool(
        tmp_path_factory.mktemp("sso"), jwt_jwks_url=idp.url, jwt_issuer=IDP_ISSUER, jwt_audience=IDP_AUDIENCE
    )
    try:
        yield harness
    finally:
        harness.stop()


def users_table(pool: Pool) -> list[tuple[int, str, str | None]]:
    path = pool.db_url.split(":///", 1)[1]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return list(conn.execute("SELECT id, email, subject FROM users ORDER BY id"))


def test_jwks_token_creates_the_user_on_first_sight(sso: Pool, idp: Jwks) -> None:
    subject = f"idp|alice-{uuid.uuid4().hex[:6]}"
    token = idp_token(idp_claims(subject), "key-a")
    first = get(sso, token)
    assert first.status_code == 200, first.text
    assert first.json() == {"data": []}
    assert idp.fetches >= 1
    created = httpx.post(
        f"{sso.url}/v1/tokens", json={"displayName": "sso"}, headers={"authorization": f"Bearer {token}"}, timeout=30
    )
    assert created.status_code == 201, created.text
    # a second session of the same subject is the same user
    again = get(sso, idp_token(idp_claims(subject), "key-a"))
    assert [row["id"] for row in again.json()["data"]] == [created.json()["id"]]
    rows = [row for row in users_table(sso) if row[2] == subject]
    assert len(rows) == 1 and rows[0][1] == f"{subject.split('|')[-1]}@idp-users.example"


def test_jwks_mode_refuses_other_tokens_and_local_accounts(sso: Pool) -> None:
    claims = idp_claims(f"idp|mallory-{uuid.uuid4().hex[:6]}")
    pem = KEY_A.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    forged = {
        "unknown key": idp_token(claims, "key-c", KEY_C),
        "unknown key claiming a known kid": idp_token(claims, "key-a", KEY_C),
        "no kid": jwt.encode(claims, KEY_A, algorithm="RS256"),
        "HS256 with the coordinator's secret": jwt.encode(claims, JWT_SECRET, algorithm="HS256"),
        "HS256 keyed with the public key (alg confusion)": hand_made(
            {"alg": "HS256", "typ": "JWT", "kid": "key-a"}, claims, hs(pem)
        ),
        "alg none with a known kid": hand_made({"alg": "none", "typ": "JWT", "kid": "key-a"}, claims),
        "RS512 with the known key": jwt.encode(claims, KEY_A, algorithm="RS512", headers={"kid": "key-a"}),
        "wrong iss": idp_token({**claims, "iss": "https://idp.example.evil"}, "key-a"),
        "wrong aud": idp_token({**claims, "aud": "pool-admin"}, "key-a"),
        "expired": idp_token({**claims, "exp": int(time.time()) - 5}, "key-a"),
        "a local session": jwt.encode(claims_for(1), JWT_SECRET, algorithm="HS256"),
    }
    for name, token in forged.items():
        response = get(sso, token)
        assert response.status_code == 401, (name, response.text)
        assert response.json()["error"]["code"] == "invalid_session", name
    assert not [row for row in users_table(sso) if row[2] == claims["sub"]]  # no user made for a refused token

    credentials = {"email": f"local-{uuid.uuid4().hex[:6]}@example.com", "password": "long enough password"}
    for path in ("/v1/auth/signup", "/v1/auth/login"):
        response = httpx.post(f"{sso.url}{path}", json=credentials, timeout=30)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "policy_blocked"


def test_jwks_key_rotation_needs_no_restart(sso: Pool, idp: Jwks) -> None:
    subject = f"idp|rotor-{uuid.uuid4().hex[:6]}"
    assert get(sso, idp_token(idp_claims(subject), "key-a", KEY_A)).status_code == 200
    pid = sso.coordinator.popen.pid if sso.coordinator else None

    idp.serve(("key-b", KEY_B))  # the identity provider rotates: B only from now on
    # A sleep on purpose: the coordinator refetches at most once a second (so unknown kids cannot flood
    # the IdP), and that second has to pass in its process.
    time.sleep(1.1)
    fetches = idp.fetches
    response = get(sso, idp_token(idp_claims(subject), "key-b", KEY_B))
    assert response.status_code == 200, (
        f"a token signed with the new key was refused after rotation ({response.text}); "
        f"JWKS fetches before/after: {fetches}/{idp.fetches}"
    )
    assert sso.coordinator is not None and sso.coordinator.popen.pid == pid and sso.coordinator.alive()
    # the key the identity provider dropped is no longer trusted
    assert_refused(get(sso, idp_token(idp_claims(subject), "key-a", KEY_A)))
