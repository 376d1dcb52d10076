"""Tokens that must not get in: every forged, stale, misaddressed or oversized JWT is refused, by
each of the three ways of giving one, and no token ever appears in the server's log.

Two real `orderlog serve` subprocesses (their stderr is the log, at DEBUG): one on RS256 with a
public key and a required audience and issuer, one on the default HS256 secret.

Oversized tokens: in the URL or a header, a token makes the request head exceed its 16 KiB limit,
so the handshake is answered HTTP 431 (Request Header Fields Too Large) before any WebSocket
exists; a careful user expects exactly that, an HTTP error naming the cause, and not a 4001,
because the token was never read. In an `auth` message, a token longer than 16 KiB is
`invalid token` (4001) unparsed, and one in a frame over max_message_size closes with 1009.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Callable
from urllib.parse import quote, urlsplit

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionClosed

from test_crash import ServerProcess
from wsclient import SECRET, TIMEOUT, connect, expect_close, recv_json, send_json

AUDIENCE = "orderlog-api"
ISSUER = "https://idp.example"
HEAD_LIMIT = 16 * 1024  # the server's request head limit (orderlog.service.http.MAX_REQUEST_HEAD_BYTES)
WAYS = ("query", "header", "message")


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_made(header: dict, claims: dict, sign: Callable[[bytes], bytes] = lambda _: b"") -> str:
    """A JWT assembled by hand (algorithms and keys PyJWT refuses to sign with)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Issuer:
    """The identity provider a server trusts: its algorithm, signing key and required claims."""

    def __init__(self, algorithm: str, key, verify_pem: bytes | None, audience: str | None, issuer: str | None):
        self.algorithm = algorithm
        self.key = key
        self.verify_pem = verify_pem
        self.audience = audience
        self.issuer = issuer

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        base = {"sub": "alice", "role": "customer", "iat": now, "exp": now + 300, "aud": self.audience,
                "iss": self.issuer}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def sign(self, key=None, algorithm: str | None = None, headers: dict | None = None, **overrides) -> str:
        return jwt.encode(self.claims(**overrides), self.key if key is None else key,
                          algorithm=algorithm or self.algorithm, headers=headers)


def _cases(issuer: Issuer) -> dict[str, tuple[Callable[[], str], str]]:
    """name -> (make the token, the close reason expected with 4001)."""
    invalid, expired = "invalid token", "token expired"
    now = int(time.time())
    attacker = _rsa()
    cases: dict[str, tuple[Callable[[], str], str]] = {
        "alg-none": (lambda: hand_made({"alg": "none", "typ": "JWT"}, issuer.claims(role="staff")), invalid),
        "alg-None": (lambda: hand_made({"alg": "None", "typ": "JWT"}, issuer.claims()), invalid),
        "alg-missing": (lambda: hand_made({"typ": "JWT"}, issuer.claims()), invalid),
        "expired": (lambda: issuer.sign(exp=now - 10, iat=now - 400), expired),
        "nbf-in-future": (lambda: issuer.sign(nbf=now + 300), invalid),
        "nbf-not-a-number": (lambda: issuer.sign(nbf="soon"), invalid),
        "missing-sub": (lambda: issuer.sign(sub=None), invalid),
        "empty-sub": (lambda: issuer.sign(sub=""), invalid),
        "sub-not-a-string": (lambda: issuer.sign(sub=["alice"]), invalid),
        "unknown-role": (lambda: issuer.sign(role="admin"), invalid),
        "role-not-a-string": (lambda: issuer.sign(role=["staff"]), invalid),
        "missing-exp": (lambda: issuer.sign(exp=None), invalid),
        "exp-a-string": (lambda: issuer.sign(exp=str(now + 300)), invalid),
        "tampered-payload": (lambda: _tamper(issuer.sign(), role="staff"), invalid),
        "garbage": (lambda: "not-a-jwt-at-all-" + "x" * 40, invalid),
        "three-empty-parts": (lambda: "..", invalid),
        "bad-base64": (lambda: "eyJhbGciOiJIUzI1NiJ9.!!!!.????", invalid),
        "header-not-json": (lambda: b64url(b"[1,2") + "." + b64url(b"{}") + ".sig", invalid),
        "too-long-for-auth": (lambda: issuer.sign(pad="p" * 17_000), invalid),  # > 16 KiB: refused unparsed
    }
    if issuer.algorithm == "RS256":
        public = issuer.verify_pem
        cases.update({
            # Algorithm confusion: HS256 with the server's public key as the HMAC secret.
            "hs256-signed-with-public-key": (lambda: hand_made(
                {"alg": "HS256", "typ": "JWT"}, issuer.claims(role="staff"),
                lambda data: hmac.new(public, data, hashlib.sha256).digest()), invalid),
            "hs256-signed-with-public-key-stripped": (lambda: hand_made(
                {"alg": "HS256", "typ": "JWT"}, issuer.claims(role="staff"),
                lambda data: hmac.new(public.strip(), data, hashlib.sha256).digest()), invalid),
            "wrong-key": (lambda: issuer.sign(key=attacker), invalid),
            "embedded-jwk": (lambda: issuer.sign(key=attacker, headers={"jwk": json.loads(
                jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))}), invalid),
            "rs512-right-key": (lambda: issuer.sign(algorithm="RS512"), invalid),
            "ps256-right-key": (lambda: issuer.sign(algorithm="PS256"), invalid),
            "wrong-aud": (lambda: issuer.sign(aud="another-api"), invalid),
            "aud-list-without-ours": (lambda: issuer.sign(aud=["a", "b"]), invalid),
            "missing-aud": (lambda: issuer.sign(aud=None), invalid),
            "wrong-iss": (lambda: issuer.sign(iss="https://evil.example"), invalid),
            "missing-iss": (lambda: issuer.sign(iss=None), invalid),
        })
    else:
        cases.update({
            "wrong-secret": (lambda: issuer.sign(key="another-secret-another-secret-xx"), invalid),
            "hs512-right-secret": (lambda: issuer.sign(algorithm="HS512"), invalid),
            "hs384-right-secret": (lambda: issuer.sign(algorithm="HS384"), invalid),
            "empty-signature": (lambda: issuer.sign().rsplit(".", 1)[0] + ".", invalid),
        })
    return cases


def _tamper(tok: str, **changes) -> str:
    header, payload, signature = tok.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


@pytest.fixture(scope="module")
def issuers(tmp_path_factory) -> dict[str, Issuer]:
    key = _rsa()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"RS256": Issuer("RS256", key, pem, AUDIENCE, ISSUER), "HS256": Issuer("HS256", SECRET, None, None, None)}


def _server(issuer: Issuer, folder) -> ServerProcess:
    if issuer.algorithm == "RS256":
        public = folder / "public.pem"
        public.write_bytes(issuer.verify_pem)
        return ServerProcess(folder / "tokens.db", "--jwt-algorithm", "RS256", "--jwt-public-key", str(public),
                             "--jwt-audience", AUDIENCE, "--jwt-issuer", ISSUER, "--log-level", "DEBUG", secret=None)
    return ServerProcess(folder / "tokens.db", "--log-level", "DEBUG", secret=SECRET)


async def _handshake_status(url: str, *, query: str = "", header: str | None = None) -> int:
    """Send a WebSocket handshake by hand and return the HTTP status of the answer (101 if accepted)."""
    parts = urlsplit(url)
    lines = [f"GET {parts.path}{query} HTTP/1.1", f"Host: {parts.netloc}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if header is not None:
        lines.append(f"Authorization: Bearer {header}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        async with stream:
            answer = b""

            async def send() -> None:
                try:
                    await stream.send_all(request)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the server answered and closed before reading it all: that is fine

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                try:
                    while b"\r\n" not in answer:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            break
                        answer += chunk
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 "), f"no HTTP answer to the handshake: {answer[:200]!r}"
    return int(answer.split(b" ", 2)[1])


async def _refused(url: str, tok: str, way: str) -> tuple[int, str | None]:
    """Offer `tok` one way; return the close (code, reason). A welcome fails the test."""
    headers = [(b"authorization", f"Bearer {tok}".encode())] if way == "header" else None
    async with connect(url, tok if way == "query" else None, headers=headers) as ws:
        if way == "message":
            await send_json(ws, {"type": "auth", "id": "a1", "token": tok})
        return await expect_close(ws)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("algorithm", ["RS256", "HS256"])
async def test_bad_tokens_are_refused_every_way_and_never_logged(issuers, tmp_path, algorithm):
    """Every forged, stale, misaddressed or malformed token is refused with 4001 and its reason by query, header
    and auth message alike, oversized ones with 431 or 1009, a query token beats a header one, and no token is
    ever logged."""
    issuer = issuers[algorithm]
    cases = _cases(issuer)
    offered: list[str] = []
    with _server(issuer, tmp_path) as server:
        url = await server.started()
        with trio.fail_after(90):
            good = issuer.sign()
            for way in WAYS:  # the control: a good token gets in every way, so refusals below mean something
                headers = [(b"authorization", f"Bearer {good}".encode())] if way == "header" else None
                async with connect(url, good if way == "query" else None, headers=headers) as ws:
                    if way == "message":
                        await send_json(ws, {"type": "auth", "token": good})
                    welcome = await recv_json(ws)
                    assert welcome["type"] == "welcome" and welcome["user"] == "alice", welcome
            offered.append(good)
            tried = refused = 0
            for name, (make, reason) in cases.items():
                tok = make()
                offered.append(tok)
                for way in WAYS:
                    if way != "message" and len(quote(tok, safe="")) > HEAD_LIMIT:
                        status = await _handshake_status(
                            url, query=f"?token={quote(tok, safe='')}" if way == "query" else "",
                            header=tok if way == "header" else None)
                        assert status == 431, (name, way, status)
                    else:
                        assert await _refused(url, tok, way) == (4001, reason), (name, way)
                        refused += 1
                    tried += 1
            # 1 MB tokens: over the head limit in the URL or a header (431), over max_message_size in a message (1009).
            huge = issuer.sign(pad="p" * 2**20)
            offered.append(huge)
            assert await _handshake_status(url, query=f"?token={huge}") == 431
            assert await _handshake_status(url, header=huge) == 431
            async with connect(url) as ws:
                try:
                    await ws.send_message(json.dumps({"type": "auth", "token": huge}))
                except ConnectionClosed as exc:  # the server may close before the client has sent it all
                    code = exc.reason.code
                else:
                    code = (await expect_close(ws))[0]
                assert code == 1009
            # A token in both the query and the header: the query's wins, whichever is the good one.
            bad = cases["expired"][0]()
            async with connect(url, good, headers=[(b"authorization", f"Bearer {bad}".encode())]) as ws:
                assert (await recv_json(ws))["type"] == "welcome"
            async with connect(url, bad, headers=[(b"authorization", f"Bearer {good}".encode())]) as ws:
                assert await expect_close(ws) == (4001, "token expired")
        assert server.stop() == 0
    log = server.stderr
    assert log.count("event=auth.refused") >= refused, log[-2000:]
    for tok in offered:
        pieces = [tok, *[part for part in tok.split(".") if len(part) >= 12]]
        leaked = [piece[:40] for piece in pieces if piece in log]
        assert not leaked, f"a token (or a part of it) is in the server's log: {leaked}"
    if algorithm == "HS256":
        assert SECRET not in log
    print(f"{algorithm}: {len(cases)} bad tokens, {tried} refusals ({refused} by 4001), plus 1 MB and precedence")
