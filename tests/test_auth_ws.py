"""Connecting to the live service: path, Origin, the three ways of sending a token, the exact
4001 close reasons, in-band refresh and the `welcome` message (docs/protocol.md section 1).

A real server on port 0 with a SQLite file in tmp_path, real trio-websocket clients.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from datetime import datetime, timezone

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from orderlog.auth import Keys
from wsclient import (
    SECRET,
    TIMEOUT,
    assert_quiet,
    connect,
    expect_close,
    expect_close_frames,
    next_id,
    raw_connection,
    recv_json,
    running_server,
    send_json,
    session,
    token,
)

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")


@pytest.fixture
async def server(tmp_path):
    """A running server with default settings (HS256 with SECRET)."""
    async with running_server(tmp_path) as running:
        yield running


def recv_json_nowait(frame: str) -> dict:
    return json.loads(frame)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_made(header: dict, claims: dict, sign=lambda signing_input: b"") -> str:
    """A JWT assembled by hand (for algorithms PyJWT would refuse to produce)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def claims(**overrides):
    now = int(time.time())
    base = {"sub": "alice", "role": "customer", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


INVALID_TOKENS = {
    "wrong-secret": lambda: token("alice", secret="another-secret-another-secret-xx"),
    "tampered-payload": lambda: _tamper(token("alice")),
    "alg-none": lambda: hand_made({"alg": "none", "typ": "JWT"}, claims()),
    "alg-none-role-staff": lambda: hand_made({"alg": "none", "typ": "JWT"}, claims(role="staff")),
    "hs512": lambda: jwt.encode(claims(), SECRET, algorithm="HS512"),
    "missing-sub": lambda: jwt.encode(claims(sub=None), SECRET, algorithm="HS256"),
    "empty-sub": lambda: jwt.encode(claims(sub=""), SECRET, algorithm="HS256"),
    "unknown-role": lambda: jwt.encode(claims(role="admin"), SECRET, algorithm="HS256"),
    "missing-exp": lambda: jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
    "garbage": lambda: "garbage",
    "three-garbage-parts": lambda: "abc.def.ghi",
}


def _tamper(tok: str) -> str:
    header, payload, signature = tok.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["role"] = "staff"
    return f"{header}.{b64url(json.dumps(body).encode())}.{signature}"


def header_auth(tok: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {tok}".encode())]


def connect_by(url: str, tok: str, via: str):
    """A connection that will present `tok` in the query string or a header; for `auth`, none
    (the caller sends the auth message)."""
    if via == "query":
        return connect(url, tok)
    if via == "header":
        return connect(url, headers=header_auth(tok))
    return connect(url)


async def first_frame_or_close(url: str, tok: str, via: str):
    """Connect presenting `tok` by `via`; return ('welcome', frame) or ('close', (code, reason))."""
    async with connect_by(url, tok, via) as ws:
        if via == "auth":
            await send_json(ws, {"type": "auth", "token": tok})
        code, reason = await expect_close(ws)
        return code, reason


# -- the endpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/ws/", "/v1/ws/x", "/v2/ws", "/v1/wss", "/V1/WS"])
async def test_other_paths_are_rejected_with_404(server, path):
    """A handshake on any path other than /v1/ws is rejected with HTTP 404."""
    url, _, _ = server
    base = url[: -len("/v1/ws")]
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(f"{base}{path}?token={token('alice')}", connect_timeout=TIMEOUT):
                pass
    assert info.value.status_code == 404


async def test_origin_not_on_the_allow_list_is_rejected_with_403(tmp_path):
    """With an allow-list, a present Origin not on it gets HTTP 403; a listed one or none is let in."""
    async with running_server(tmp_path, allow_origins=("https://shop.example", "http://localhost:3000")) as (url, _, _):
        for origin in ("https://evil.example", "https://shop.example.evil", "null", "http://localhost:3001"):
            with trio.fail_after(TIMEOUT):
                with pytest.raises(ConnectionRejected) as info:
                    async with connect(url, token("alice"), headers=[(b"Origin", origin.encode())]):
                        pass
            assert info.value.status_code == 403, origin
        for headers in ([(b"Origin", b"https://shop.example")], [(b"Origin", b"http://localhost:3000")], None):
            async with connect(url, token("alice"), headers=headers) as ws:
                assert (await recv_json(ws))["type"] == "welcome"


async def test_without_allow_list_any_origin_is_accepted(server):
    """A server without an allow-list accepts a browser handshake from any Origin."""
    url, _, _ = server
    async with connect(url, token("alice"), headers=[(b"Origin", b"https://anywhere.example")]) as ws:
        assert (await recv_json(ws))["type"] == "welcome"


# -- the three ways of sending a token ---------------------------------------------------------


@pytest.mark.parametrize("via", ["query", "header", "auth"])
async def test_a_valid_token_by_each_way_gets_welcome(server, via):
    """A valid token by query string, Authorization header or first `auth` message gets `welcome`."""
    url, _, _ = server
    tok = token("alice", "staff")
    async with connect_by(url, tok, via) as ws:
        if via == "auth":
            await send_json(ws, {"type": "auth", "token": tok, "id": "a-1"})
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome"
        assert (welcome["user"], welcome["role"]) == ("alice", "staff")
        if via == "auth":
            assert welcome["id"] == "a-1"
        await send_json(ws, {"type": "ping", "id": "p"})
        assert await recv_json(ws) == {"type": "pong", "id": "p", "head": 0, "head_hash": None}


async def test_query_token_wins_over_header_token(server):
    """A good query token with a bad header token is accepted (query string first)."""
    url, _, _ = server
    async with connect(url, token("alice"), headers=header_auth("garbage")) as ws:
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome" and welcome["user"] == "alice"
    # ... and the other way round the query token decides too.
    async with connect(url, "garbage", headers=header_auth(token("alice"))) as ws:
        assert await expect_close(ws) == (4001, "invalid token")


async def test_authorization_header_of_another_scheme_is_no_token(server):
    """An Authorization header that is not `Bearer` carries no token: the first `auth` message decides."""
    url, _, _ = server
    async with connect(url, headers=[(b"Authorization", b"Basic YWxpY2U6c2VjcmV0")]) as ws:
        await send_json(ws, {"type": "auth", "token": token("alice")})
        assert (await recv_json(ws))["user"] == "alice"
    async with connect(url, headers=[(b"Authorization", b"Basic YWxpY2U6c2VjcmV0")]) as ws:
        await send_json(ws, {"type": "ping"})
        assert await expect_close(ws) == (4001, "authentication required")


async def test_header_token_wins_over_auth_message(server):
    """With a header token, a later `auth` message is an in-band refresh, not the first token."""
    url, _, _ = server
    async with connect(url, headers=header_auth(token("alice"))) as ws:
        assert (await recv_json(ws))["user"] == "alice"
        await send_json(ws, {"type": "auth", "token": token("bob")})
        assert await expect_close(ws) == (4001, "token subject changed")


async def test_role_defaults_to_customer(server):
    """A token without a role claim is a customer's."""
    url, _, _ = server
    tok = jwt.encode(claims(role=None), SECRET, algorithm="HS256")
    async with connect(url, tok) as ws:
        welcome = await recv_json(ws)
        assert (welcome["user"], welcome["role"]) == ("alice", "customer")


# -- refused tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["query", "header", "auth"])
@pytest.mark.parametrize("kind", sorted(INVALID_TOKENS))
async def test_invalid_tokens_close_4001_invalid_token(server, kind, via):
    """A bad signature, algorithm, format or claim closes with 4001 `invalid token`, whatever the way."""
    url, _, _ = server
    assert await first_frame_or_close(url, INVALID_TOKENS[kind](), via) == (4001, "invalid token")


@pytest.mark.parametrize("via", ["query", "header", "auth"])
async def test_expired_token_closes_4001_token_expired(server, via):
    """A token whose exp has passed closes with 4001 `token expired`."""
    url, _, _ = server
    tok = token("alice", ttl=-60)
    assert await first_frame_or_close(url, tok, via) == (4001, "token expired")


@pytest.mark.parametrize("message", [
    {"type": "auth"},
    {"type": "auth", "token": None},
    {"type": "auth", "token": 123},
    {"type": "auth", "token": ["a.b.c"]},
    {"type": "auth", "token": {"jwt": "a.b.c"}},
    {"type": "auth", "token": ""},
])
async def test_auth_message_without_a_string_token_is_invalid(server, message):
    """An `auth` whose token is missing or not a string closes with 4001 `invalid token`."""
    url, _, _ = server
    async with connect(url) as ws:
        await send_json(ws, message)
        assert await expect_close(ws) == (4001, "invalid token")


async def test_auth_message_is_judged_by_its_token_only(server):
    """Unknown fields in an `auth` message do not matter: a good token gets `welcome`."""
    url, _, _ = server
    async with connect(url) as ws:
        await send_json(ws, {"type": "auth", "token": token("alice"), "extra": [1, 2], "client": "x"})
        assert (await recv_json(ws))["type"] == "welcome"


def rsa_keys():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


@pytest.mark.parametrize("via", ["query", "auth"])
async def test_rs256_server_refuses_hs256_signed_with_the_public_key(tmp_path, via):
    """Algorithm confusion: HS256 with the RSA public key as HMAC secret is `invalid token`."""
    private_pem, public_pem = rsa_keys()
    async with running_server(tmp_path, keys=Keys("RS256", public_pem.decode())) as (url, _, _):
        good = jwt.encode(claims(role="staff"), private_pem, algorithm="RS256")
        async with connect(url, good) as ws:
            welcome = await recv_json(ws)
            assert (welcome["type"], welcome["role"]) == ("welcome", "staff")
        for key in (public_pem, public_pem.strip()):
            forged = hand_made({"alg": "HS256", "typ": "JWT"}, claims(role="staff"),
                               lambda data, key=key: hmac.new(key, data, hashlib.sha256).digest())
            assert await first_frame_or_close(url, forged, via) == (4001, "invalid token")
        assert await first_frame_or_close(url, token("alice"), via) == (4001, "invalid token")
        none = hand_made({"alg": "none"}, claims())
        assert await first_frame_or_close(url, none, via) == (4001, "invalid token")


async def test_audience_and_issuer_are_checked_when_configured(tmp_path):
    """With aud and iss configured, a token without them or with others is `invalid token`."""
    keys = Keys("HS256", SECRET, audience="orderlog-api", issuer="https://auth.example")
    async with running_server(tmp_path, keys=keys) as (url, _, _):
        good = jwt.encode(claims(aud="orderlog-api", iss="https://auth.example"), SECRET, algorithm="HS256")
        async with connect(url, good) as ws:
            assert (await recv_json(ws))["type"] == "welcome"
        for bad in (claims(), claims(aud="other", iss="https://auth.example"),
                    claims(aud="orderlog-api"), claims(aud="orderlog-api", iss="https://evil.example")):
            tok = jwt.encode(bad, SECRET, algorithm="HS256")
            assert await first_frame_or_close(url, tok, "query") == (4001, "invalid token"), bad


# -- no token ----------------------------------------------------------------------------------


async def test_no_token_and_silence_closes_authentication_timeout(tmp_path):
    """Without a handshake token and with no frame within auth_timeout: 4001 `authentication timeout`."""
    async with running_server(tmp_path, auth_timeout=0.5) as (url, _, _):
        async with connect(url) as ws:
            started = trio.current_time()
            assert await expect_close(ws, timeout=5) == (4001, "authentication timeout")
            assert 0.4 <= trio.current_time() - started < 4


@pytest.mark.parametrize("frame", [
    json.dumps({"type": "ping", "id": "p"}),
    json.dumps({"type": "subscribe", "channel": "orders"}),
    json.dumps({"token": "a.b.c"}),
    json.dumps({"type": "AUTH", "token": "a.b.c"}),
    json.dumps([{"type": "auth"}]),
    json.dumps("auth"),
    "not json at all",
    "",
    b"\x00\x01binary",
    json.dumps({"type": "auth", "token": "x"}).encode(),  # binary, whatever it holds
], ids=["ping", "subscribe", "no-type", "wrong-case", "array", "string", "not-json", "empty", "binary",
        "binary-auth"])
async def test_first_frame_not_auth_closes_authentication_required(server, frame):
    """Without a handshake token, a first frame that is not a JSON `auth` object: `authentication required`."""
    url, _, _ = server
    async with connect(url) as ws:
        with trio.fail_after(TIMEOUT):
            await ws.send_message(frame)
        assert await expect_close(ws) == (4001, "authentication required")


# -- after the handshake -----------------------------------------------------------------------


async def test_requests_right_after_auth_are_answered_after_welcome(server):
    """Requests sent right behind an `auth` message (or a handshake token) come after `welcome`."""
    url, _, _ = server
    async with connect(url) as ws:
        await send_json(ws, {"type": "auth", "token": token("alice")})
        await send_json(ws, {"type": "ping", "id": "p1"})
        await send_json(ws, {"type": "get", "sku": "nothing", "id": "g1"})
        assert (await recv_json(ws))["type"] == "welcome"
        assert (await recv_json(ws)) == {"type": "pong", "id": "p1", "head": 0, "head_hash": None}
        assert (await recv_json(ws))["id"] == "g1"
    async with connect(url, token("alice")) as ws:
        await send_json(ws, {"type": "ping", "id": "p2"})
        assert (await recv_json(ws))["type"] == "welcome"
        assert (await recv_json(ws))["id"] == "p2"


async def test_refresh_with_same_subject_gets_new_welcome_and_keeps_connection(server):
    """An in-band `auth` with the same sub answers a new `welcome` with the new expires_at."""
    url, _, _ = server
    async with session(url, "alice", ttl=100) as client:
        first = client.welcome
        reply = await client.request({"type": "auth", "token": token("alice", ttl=5000)})
        assert reply["type"] == "welcome" and reply["user"] == "alice"
        assert reply["expires_at"] > first["expires_at"]
        assert reply["log_id"] == first["log_id"]
        await client.ping()


async def test_refresh_with_another_subject_closes_4001(server):
    """An in-band `auth` with another sub closes with 4001 `token subject changed`."""
    url, _, _ = server
    async with session(url, "alice", "staff") as client:
        await client.send({"type": "auth", "token": token("bob", "staff")})
        assert await expect_close(client.ws) == (4001, "token subject changed")


@pytest.mark.parametrize("new, reason", [
    (lambda: token("alice", ttl=-5), "token expired"),
    (lambda: token("alice", secret="wrong-secret-wrong-secret-wrong-s"), "invalid token"),
    (lambda: 42, "invalid token"),
    (lambda: None, "invalid token"),
])
async def test_refresh_with_a_bad_token_closes_with_its_reason(server, new, reason):
    """An invalid or expired refresh token closes with 4001 and its reason."""
    url, _, _ = server
    async with session(url, "alice") as client:
        await client.send({"type": "auth", "token": new(), "id": "a"})
        assert await expect_close(client.ws) == (4001, reason)


async def test_token_expiring_while_connected_closes_unless_refreshed(server):
    """When the token's exp passes the server closes with 4001 `token expired`; a refresh prevents it."""
    url, _, _ = server
    async with session(url, "alice", ttl=2) as stale, session(url, "alice", ttl=2) as fresh, \
            session(url, "alice", ttl=300) as shortened:
        reply = await fresh.request({"type": "auth", "token": token("alice", ttl=300)})
        assert reply["type"] == "welcome"
        reply = await shortened.request({"type": "auth", "token": token("alice", ttl=2)})
        assert reply["type"] == "welcome"
        assert await expect_close(stale.ws, timeout=4) == (4001, "token expired")
        assert await expect_close(shortened.ws, timeout=2) == (4001, "token expired")
        await fresh.ping()
        await assert_quiet(fresh.ws, 0.5)
        await fresh.ping()


# -- welcome -----------------------------------------------------------------------------------


async def test_welcome_fields(tmp_path):
    """`welcome` carries user, role, head, a stable log_id and expires_at equal to the token's exp."""
    db = tmp_path / "a.db"
    async with running_server(tmp_path, db=db) as (url, _, _):
        tok = token("auditor-1", "auditor", ttl=1234)
        exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
        async with connect(url, tok) as ws:
            welcome = await recv_json(ws)
        assert set(welcome) == {"type", "user", "role", "head", "head_hash", "log_id", "expires_at"}
        assert (welcome["user"], welcome["role"], welcome["head"]) == ("auditor-1", "auditor", 0)
        assert isinstance(welcome["log_id"], str) and welcome["log_id"]
        assert RFC3339_Z.match(welcome["expires_at"]), welcome["expires_at"]
        assert datetime.fromisoformat(welcome["expires_at"].replace("Z", "+00:00")) == datetime.fromtimestamp(exp, timezone.utc)
        log_id = welcome["log_id"]
        async with session(url, "staff-1", "staff") as staff:
            await staff.ok("add_stock", data={"sku": "kibble", "quantity": 3})
            await staff.ok("add_stock", data={"sku": "kibble", "quantity": 4})
        async with session(url, "bob") as bob:
            assert bob.welcome["head"] == 2 and bob.welcome["role"] == "customer"
            assert bob.welcome["log_id"] == log_id
    async with running_server(tmp_path, db=db) as (url, _, _):
        async with session(url, "bob") as bob:
            assert bob.welcome["log_id"] == log_id, "log_id must survive a restart"
            assert bob.welcome["head"] == 2
    async with running_server(tmp_path, db=tmp_path / "b.db") as (url, _, _):
        async with session(url, "bob") as bob:
            assert bob.welcome["log_id"] and bob.welcome["log_id"] != log_id
            assert bob.welcome["head"] == 0


async def test_refused_token_gets_no_frame_before_the_close(server):
    """A refused handshake token gets the 4001 close and nothing else (no welcome, no reply)."""
    url, _, _ = server
    async with connect(url, "garbage") as ws:
        with trio.fail_after(TIMEOUT):
            try:
                await ws.send_message(json.dumps({"type": "ping", "id": next_id()}))
            except ConnectionClosed:
                pass
        code, reason, frames = await expect_close_frames(ws)
        assert (code, reason, frames) == (4001, "invalid token", [])


async def test_keepalive_pings_keep_a_live_client_and_drop_a_dead_one(tmp_path):
    """The server pings every ping_interval: a client that answers stays connected, one that does not is closed."""
    async with running_server(tmp_path, ping_interval=0.3) as (url, _, _):
        async with session(url, "alice") as alive, raw_connection(url, token("bob"), queue=1) as (dead, _):
            # `dead` never reads: its welcome fills the client's queue, so once the pong below
            # arrives its reader stops and it answers no WebSocket ping any more.
            await send_json(dead, {"type": "ping", "id": "p"})
            await trio.sleep(1.5)
            await alive.ping()
            frames = []
            with trio.fail_after(TIMEOUT):
                with pytest.raises(ConnectionClosed):
                    while True:
                        frames.append(recv_json_nowait(await dead.get_message()))
            assert [f["type"] for f in frames] == ["welcome", "pong"]
            await alive.ping()
