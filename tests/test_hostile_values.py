"""Hostile values in every field: no value crashes a connection or logs a traceback.

Each request type is taken in a valid form, one of its fields (top level, `data.*`, `filter.*`,
`data.items[0].*`, or a token claim) is replaced by a hostile JSON value (lone surrogate escapes,
integers beyond SQLite's 64 bits or beyond a float, 1e400 = inf, NaN, times at the ends of the
calendar, control and bidi characters), and the frame is sent to a real server over a real
socket. The answer must be a well-formed reply or error (never `internal`, never a close other
than 4001 for a token), the connection must still answer a ping, and the server's log must hold
no traceback.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from orderlog import auth
from orderlog.auth import AuthError, Keys
from test_crash import ServerProcess
from wsclient import EVENT_TYPES, SECRET, TIMEOUT, connect, decode, session, token

CODES = {"bad_request", "unknown_type", "forbidden", "not_found", "conflict", "invalid_state",
         "insufficient_stock", "rate_limited", "resync_required", "unavailable"}  # never `internal`
REPLIES = {"welcome", "subscribed", "live", "unsubscribed", "ack", "order", "stock", "result", "pong", "error",
           "snapshot"}


class Raw(str):
    """JSON text put into a frame as is (NaN, Infinity, 1e400, numbers Python would not print)."""


# The values an attacker tried, and their siblings.
HOSTILE: list[Any] = [
    "\ud800", "a\udfffb", "\udbff\udfff\ud800", "\n", "x\nevent=forged user=root", "\u202eevil", "\x00", "\"'\\",
    2**63, 2**63 - 1, 2**64, -(2**63) - 1, 2**1100, 10**30, -(10**30), 1e20, 1e308, -1e308, 5e-324, -0.0,
    Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1" * 4000),
    "9999-12-31T23:59:59.9999+00:00", "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59",
    "0000-01-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01T24:00:00Z",
    True, False, None, [], {}, [None], {"": None}, "", "x" * 300,
]
hostile_values = st.sampled_from(HOSTILE) | st.integers() | st.text(max_size=8)


def render(value: Any) -> str:
    """JSON text of `value`, with Raw parts verbatim and lone surrogates as \\u escapes."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)  # ensure_ascii: a lone surrogate becomes "\ud800"


ITEM = {"sku": "kibble", "quantity": 1}
TEMPLATES: dict[str, dict[str, Any]] = {
    "subscribe": {"type": "subscribe", "channel": "orders", "since": 0, "log_id": "x"},
    "subscribe-order": {"type": "subscribe", "channel": "order:o-1"},
    "subscribe-anchor": {"type": "subscribe", "channel": "orders", "since": 1, "anchor": {"seq": 1, "hash": "0" * 64}},
    "subscribe-snapshot": {"type": "subscribe", "channel": "inventory", "snapshot": True},
    "unsubscribe": {"type": "unsubscribe", "channel": "orders"},
    "place_order": {"type": "command", "name": "place_order", "order_id": "o-new", "expected_version": 0,
                    "data": {"items": [dict(ITEM)], "ship_to": "here", "note": "n", "customer": "alice"}},
    "add_stock": {"type": "command", "name": "add_stock", "data": {"sku": "kibble", "quantity": 1, "name": "K"}},
    "update_order": {"type": "command", "name": "update_order", "order_id": "o-1", "data": {"ship_to": "a", "note": "b"}},
    "approve_order": {"type": "command", "name": "approve_order", "order_id": "o-1", "expected_version": 1},
    "ship_order": {"type": "command", "name": "ship_order", "order_id": "o-1", "data": {"carrier": "c", "tracking": "t"}},
    "cancel_order": {"type": "command", "name": "cancel_order", "order_id": "o-1", "data": {"reason": "r"}},
    "get-order": {"type": "get", "order_id": "o-1"},
    "get-sku": {"type": "get", "sku": "kibble"},
    "get-as-of": {"type": "get", "order_id": "o-1", "as_of": 1, "anchor": {"seq": 1, "hash": "0" * 64}},
    "query": {"type": "query", "limit": 10, "filter": {
        "stream": "order:o-1", "order_id": "o-1", "types": ["order-created"], "actor": "alice", "after": 0,
        "until": 100, "from_time": "2020-01-01T00:00:00Z", "to_time": "2100-01-01T00:00:00+02:00"}},
    "ping": {"type": "ping"},
    "auth": {"type": "auth", "token": "TOKEN"},
}


def _paths(message: dict[str, Any]) -> list[tuple]:
    """Every field of a template (nested ones as tuples of keys), plus `id` and `type`."""
    paths: list[tuple] = [("id",), ("type",)]
    for key, value in message.items():
        if key == "type":
            continue
        paths.append((key,))
        if isinstance(value, dict):
            for inner, sub in value.items():
                paths.append((key, inner))
                if isinstance(sub, list) and sub and isinstance(sub[0], dict):
                    paths += [(key, inner, 0, leaf) for leaf in sub[0]]
                elif isinstance(sub, list):
                    paths.append((key, inner, 0))
    return paths


def _set(message: Any, path: tuple, value: Any) -> Any:
    message = json.loads(json.dumps(message))
    target = message
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return message


@st.composite
def hostile_requests(draw) -> tuple[str, str]:
    """(name, frame text): one template with one field replaced by a hostile value."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    template = TEMPLATES[name]
    path = draw(st.sampled_from(_paths(template)))
    message = _set(template, path, draw(hostile_values))
    return f"{name}:{'.'.join(map(str, path))}", render(message)


CLAIMS = ("exp", "nbf", "iat", "sub", "role", "aud", "iss")


@st.composite
def hostile_tokens(draw) -> str:
    """A correctly signed token whose one claim is hostile."""
    now = int(time.time())
    claims = {"sub": "alice", "role": "customer", "iat": now, "exp": now + 300}
    claims[draw(st.sampled_from(CLAIMS))] = draw(hostile_values)
    payload = render(claims).encode()
    return jwt.api_jws.encode(payload, SECRET, algorithm="HS256")


# -- the core promise: auth.verify refuses with AuthError, nothing else ---------------------------


@settings(max_examples=300, deadline=None)
@given(tok=hostile_tokens())
def test_verify_refuses_any_hostile_claim_with_an_auth_error(tok):
    """auth.verify either accepts a token (and its expiry has an RFC 3339 form) or raises AuthError."""
    try:
        claims = auth.verify(tok, Keys("HS256", SECRET), time.time())
    except AuthError as exc:
        assert exc.reason in (auth.INVALID, auth.EXPIRED)
    else:
        assert auth.rfc3339(claims.expires_at).endswith("Z")


@pytest.mark.parametrize("tok", ["\ud800", "a\udfffb.c.d", "x" * 20_000, "", "..", "\x00"])
def test_verify_refuses_malformed_token_strings_as_invalid(tok):
    with pytest.raises(AuthError) as refused:
        auth.verify(tok, Keys("HS256", SECRET), time.time())
    assert refused.value.reason == auth.INVALID


# -- over a real socket --------------------------------------------------------------------------


async def _probe(ws, probe: str, name: str, frame: str) -> list[dict]:
    """Send a ping with id `probe`; return what came before its pong. Fails if the connection closed."""
    seen = []
    try:
        await ws.send_message(json.dumps({"type": "ping", "id": probe}))
        with trio.fail_after(TIMEOUT):
            while True:
                message = decode(await ws.get_message())
                if message.get("id") == probe and message["type"] == "pong":
                    return seen
                seen.append(message)
    except ConnectionClosed as exc:
        raise Closed(exc.reason, f"{name}: closed {exc.reason} after {frame[:300]!r}") from None


class Closed(AssertionError):
    def __init__(self, reason, text: str):
        super().__init__(text)
        self.reason = reason


def _check(name: str, frame: str, answers: list[dict]) -> None:
    for message in answers:
        assert message["type"] in REPLIES | EVENT_TYPES, (name, frame[:300], message)
        if message["type"] == "error":
            assert message["code"] in CODES, (name, frame[:300], message)
            assert isinstance(message["message"], str), message


async def _throw(url: str, cases: list[tuple[str, str]], tok: str, counter: list[int]) -> None:
    async with connect(url, tok) as ws:
        assert decode(await ws.get_message())["type"] == "welcome"
        for name, frame in cases:
            counter[0] += 1
            frame = frame.replace('"TOKEN"', json.dumps(tok))
            await ws.send_message(frame)
            try:
                answers = await _probe(ws, f"probe-{counter[0]}", name, frame)
            except Closed as closed:
                # A refresh with a bad token closes with 4001 and its reason: that is right.
                if name.startswith("auth") and closed.reason.code == 4001:
                    assert closed.reason.reason in (auth.INVALID, auth.EXPIRED, auth.SUBJECT_CHANGED), closed
                    return
                raise
            _check(name, frame, answers)


async def _first_auth(url: str, frame: str) -> None:
    """A first `auth` frame: welcome (then a ping works), or close 4001 `invalid token`."""
    async with connect(url) as ws:
        await ws.send_message(frame)
        try:
            with trio.fail_after(TIMEOUT):
                first = decode(await ws.get_message())
        except ConnectionClosed as exc:
            assert exc.reason.code == 4001, (frame[:300], exc.reason)
            assert exc.reason.reason in (auth.INVALID, auth.EXPIRED), (frame[:300], exc.reason)
            return
        assert first["type"] == "welcome", first
        await _probe(ws, "after-welcome", "first-auth", frame)


async def _seed(url: str) -> None:
    async with session(url, "s-seed", "staff") as staff:
        await staff.ok("add_stock", data={"sku": "kibble", "quantity": 100_000})
        await staff.ok("place_order", "o-1", {"items": [dict(ITEM)], "customer": "alice"})


def test_hostile_values_in_every_field_get_an_error_frame_and_keep_the_connection(tmp_path):
    """Every field of every request type, and every token claim, with hostile values: a well-formed
    reply or error (4001 for a token), the connection keeps answering, and no traceback is logged."""
    with ServerProcess(tmp_path / "hostile.db") as server:
        url = server.wait_url()
        trio.run(_seed, url)
        counter = [0]
        staff, customer = token("s-1", "staff"), token("alice")

        @settings(max_examples=120, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(cases=st.lists(hostile_requests(), min_size=1, max_size=8), as_staff=st.booleans())
        def throw(cases, as_staff):
            trio.run(_throw, url, cases, staff if as_staff else customer, counter)

        @settings(max_examples=60, deadline=None, database=None)
        @given(tok=hostile_tokens() | hostile_values, request_id=st.sampled_from(["\ud800", "ok", 2**70, None]))
        def first_auth(tok, request_id):
            message: dict[str, Any] = {"type": "auth", "token": tok}
            if request_id is not None:
                message["id"] = request_id
            trio.run(_first_auth, url, render(message))

        # The attacker's own cases first, whatever hypothesis draws.
        for case in ({"type": "auth", "token": "\ud800"}, {"type": "auth", "id": "\ud800", "token": token("alice")}):
            trio.run(_first_auth, url, render(case))
        for exp in (1e20, 10**30, 2**1100):
            for claim in ("exp", "nbf"):
                now = int(time.time())
                claims = {"sub": "alice", "exp": now + 300, "nbf": now - 10, claim: exp}
                tok = jwt.api_jws.encode(render(claims).encode(), SECRET, algorithm="HS256")
                trio.run(_first_auth, url, render({"type": "auth", "token": tok}))
        query = TEMPLATES["query"]
        attacks = [render(_set(query, ("filter", key), value)) for key, value in
                   [("after", 2**63), ("until", 2**63), ("to_time", "9999-12-31T23:59:59.9999+00:00"),
                    ("from_time", "0001-01-01T00:00:00+23:59")]]
        trio.run(_throw, url, [("query-attack", a) for a in attacks], staff, counter)
        # The v1.2 fields (anchor, as_of, snapshot) with every hostile value, whatever hypothesis draws.
        v12 = {"subscribe-anchor": [("since",), ("anchor",), ("anchor", "seq"), ("anchor", "hash")],
               "get-as-of": [("as_of",), ("anchor",), ("anchor", "seq"), ("anchor", "hash")],
               "subscribe-snapshot": [("snapshot",), ("channel",)]}
        for who in (staff, customer):
            trio.run(_throw, url, [(f"{name}:{'.'.join(path)}", render(_set(TEMPLATES[name], path, value)))
                                   for name, paths in v12.items() for path in paths for value in HOSTILE],
                     who, counter)
        throw()
        first_auth()
        assert server.proc.poll() is None, "the server died"
        assert server.stop() == 0
        assert "Traceback" not in server.stderr, server.stderr[-3000:]
        assert "crashed" not in server.stderr, server.stderr[-3000:]


@pytest.mark.parametrize("args", [
    ["events", "--after", str(2**64)], ["events", "--until", str(2**63)], ["events", "--limit", str(10**30)],
    ["token", "--jwt-secret", SECRET, "--sub", "a", "--ttl", f"{10**20}s"],
])
def test_the_cli_refuses_numbers_beyond_sqlite_and_datetime_with_one_line(cli, seeded_db, args):
    """The same edges on the command line: a one-line error and exit 2, no traceback (and no token that every
    server would refuse)."""
    done = cli(*args, "--db", seeded_db)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
