"""The fast receive path: orderlog/wire.py's splitter against wsproto, and the live server fed
frames by hand (pipelined, fragmented, binary, control, close, oversized, invalid UTF-8, an
auth message with requests right behind it).

What matters: the splitter passes on every byte exactly once and in order, takes only simple
text frames (which wsproto would read as the same text), and the server answers every request
in order whether it came the fast way or the usual one.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from urllib.parse import urlsplit

import trio
import wsproto
from hypothesis import given, settings, strategies as st
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage

from orderlog.wire import FrameSplitter, MessageEnd, Violation, unmask
from test_hostile import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, Closed, RawWS, frame_bytes
from wsclient import TIMEOUT, running_server, token

MAX = 1024


def _raw(item) -> bytes:
    return item[1] if isinstance(item, tuple) else item


def _wsproto_messages(data: bytes) -> list:
    """What a wsproto server (no size limit) reads from these client bytes: texts and bytes."""
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/v1/ws")))
    assert isinstance(next(server.events()), Request)
    server.send(AcceptConnection())
    server.receive_data(data)
    out, parts = [], []
    for event in server.events():
        if isinstance(event, (TextMessage, BytesMessage)):
            parts.append(event.data)
            if event.message_finished:
                out.append(("".join(parts) if isinstance(event, TextMessage) else b"".join(parts)))
                parts = []
    return out


# A client's frames: simple texts, fragmented texts with a ping inside, binary, pings and pongs.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
simple = texts.map(lambda t: ("simple", t, frame_bytes(TEXT, t.encode())))
long_text = st.integers(126, MAX).map(lambda n: ("simple", "é" * (n // 2), frame_bytes(TEXT, ("é" * (n // 2)).encode())))


def _fragmented(t: str, cut: int) -> tuple:
    raw = t.encode()
    cut = min(cut, len(raw))
    wire = (frame_bytes(TEXT, raw[:cut], fin=False) + frame_bytes(PING, b"p")
            + frame_bytes(CONTINUATION, raw[cut:]))
    return ("slow", t, wire)


fragmented = st.builds(_fragmented, texts, st.integers(0, 50))
binary = st.binary(max_size=100).map(lambda b: ("slow", b, frame_bytes(BINARY, b)))
control = st.sampled_from([("control", None, frame_bytes(PING, b"x")), ("control", None, frame_bytes(PONG))])
frames = st.lists(simple | long_text | fragmented | binary | control, max_size=12)


@settings(max_examples=200, deadline=None)
@given(frames, st.lists(st.integers(1, 300), min_size=1, max_size=20))
def test_splitter_passes_every_byte_once_and_takes_only_simple_texts(sent, cuts):
    """Cut anywhere: the items hold the input bytes in order; the texts taken are exactly the
    simple frames' (equal to what wsproto reads); every other data message ends in a MessageEnd."""
    wire = b"".join(f for _, _, f in sent)
    splitter = FrameSplitter(MAX)
    items, pos, i = [], 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        items += splitter.feed(wire[pos:pos + step])
        pos += step
        i += 1
    assert b"".join(_raw(item) for item in items) == wire
    assert [item[0] for item in items if isinstance(item, tuple)] == [t for kind, t, _ in sent if kind == "simple"]
    assert sum(type(item) is MessageEnd for item in items) == sum(kind == "slow" for kind, _, _ in sent)
    # wsproto reads the same messages from the same bytes, in the same order.
    assert _wsproto_messages(wire) == [m for kind, m, _ in sent if kind != "control"]


def test_unmask_is_its_own_inverse():
    key = b"\x01\x82\x43\xf4"
    for n in (0, 1, 3, 4, 5, 125, 1000):
        payload = os.urandom(n)
        assert unmask(unmask(payload, key), key) == payload


def test_after_a_close_frame_everything_goes_to_wsproto():
    splitter = FrameSplitter(MAX)
    close = frame_bytes(CLOSE, struct.pack("!H", 1000))
    after = frame_bytes(TEXT, b'{"type":"ping"}')
    assert splitter.feed(close + after) == [close, after]
    assert splitter.feed(after) == [after]


def test_a_bad_header_ends_in_a_violation_and_nothing_after_it_is_read():
    """Reserved bits, an unmasked frame, an unknown opcode, a fragmented or long control frame:
    a Violation with 1002 (the server sends that close frame), and what follows is dropped."""
    for bad in (frame_bytes(TEXT, b"x", rsv=4), frame_bytes(TEXT, b"x", masked=False), frame_bytes(3, b"x"),
                frame_bytes(PING, b"x", fin=False), frame_bytes(PING, b"x" * 126)):
        splitter = FrameSplitter(MAX)
        good = frame_bytes(TEXT, b"{}")
        items = splitter.feed(good + bad + good)
        assert items[0] == ("{}", good) and len(items) == 2
        assert type(items[1]) is Violation and items[1].code == 1002
        assert splitter.feed(good) == []


def test_invalid_utf8_is_a_1007_violation():
    frame = frame_bytes(TEXT, b'{"id":"\xff"}')
    (item,) = FrameSplitter(MAX).feed(frame)
    assert item == Violation(1007, "text message is not valid UTF-8")


def test_a_frame_over_the_limit_passes_as_it_arrives():
    """Never buffered here: each piece goes on at once (trio-websocket closes with 1009)."""
    splitter = FrameSplitter(MAX)
    big = frame_bytes(TEXT, b"x" * (MAX + 1))
    after = frame_bytes(TEXT, b"{}")
    pieces = [big[:5], big[5:10], big[10:100], big[100:] + after]
    out = [splitter.feed(p) for p in pieces]
    assert out[0] == []  # an incomplete header (2 + 2 + 4 bytes) is kept
    assert out[1] == [big[:10]] and out[2] == [big[10:100]]
    assert out[3] == [big[100:], ("{}", after)]


def test_a_frame_of_exactly_the_limit_is_taken():
    payload = b'"' + b"x" * (MAX - 2) + b'"'
    frame = frame_bytes(TEXT, payload)
    assert FrameSplitter(MAX).feed(frame) == [(payload.decode(), frame)]


# -- the live server -------------------------------------------------------------------------------


def _ping(i: int) -> bytes:
    return frame_bytes(TEXT, json.dumps({"type": "ping", "id": f"p{i}"}).encode())


async def _replies(ws: RawWS, count: int) -> list[dict]:
    with trio.fail_after(TIMEOUT):
        return [await ws.recv() for _ in range(count)]


async def test_pipelined_and_fragmented_requests_are_answered_in_order(tmp_path):
    """Requests in one write, some fragmented (wsproto's way) between simple ones (the fast way),
    a binary frame and pings among them: every reply comes, in the order sent."""
    async with running_server(tmp_path) as (url, _, _):
        ws = await RawWS.open(url, token("s1", "staff"))
        try:
            wire, expected = b"", []
            for i in range(60):
                body = json.dumps({"type": "ping", "id": f"p{i}"}).encode()
                if i % 7 == 3:
                    wire += frame_bytes(TEXT, body[:5], fin=False) + frame_bytes(PING, b"k")
                    wire += frame_bytes(CONTINUATION, body[5:10], fin=False) + frame_bytes(CONTINUATION, body[10:])
                elif i % 11 == 5:
                    wire += frame_bytes(BINARY, body)
                else:
                    wire += frame_bytes(TEXT, body)
                expected.append(("error", None) if i % 11 == 5 and i % 7 != 3 else ("pong", f"p{i}"))
            assert await ws.send(wire)
            got = [(r["type"], r.get("id")) for r in await _replies(ws, len(expected))]
            assert got == expected
            # Commands, placed and approved in one write: acked in order, with increasing seqs.
            wire = frame_bytes(TEXT, json.dumps({"type": "command", "id": "stock", "name": "add_stock",
                                                 "data": {"sku": "kibble", "quantity": 100}}).encode())
            for i in range(20):
                command = {"type": "command", "id": f"c{i}", "name": "place_order", "order_id": f"o{i}",
                           "data": {"items": [{"sku": "kibble", "quantity": 1}], "customer": "u1"}}
                body = json.dumps(command).encode()
                if i % 5 == 2:
                    wire += frame_bytes(TEXT, body[:7], fin=False) + frame_bytes(CONTINUATION, body[7:])
                else:
                    wire += frame_bytes(TEXT, body)
            assert await ws.send(wire)
            acks = await _replies(ws, 21)
            assert [a["id"] for a in acks] == ["stock"] + [f"c{i}" for i in range(20)]
            assert all(a["type"] == "ack" for a in acks), acks
            seqs = [a["seq"] for a in acks]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        finally:
            await ws.aclose()


async def test_auth_message_with_requests_right_behind_it(tmp_path):
    """No token in the URL: the auth message and the requests behind it come in one write, even
    before the 101; the welcome comes first, then every reply in order."""
    async with running_server(tmp_path) as (url, _, _):
        parts = urlsplit(url)
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        head = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        auth = frame_bytes(TEXT, json.dumps({"type": "auth", "token": token("u1")}).encode())
        await stream.send_all(head.encode() + auth + b"".join(_ping(i) for i in range(30)))
        data = b""
        with trio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
        answer, _, rest = data.partition(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 101")
        ws = RawWS(stream, rest)
        try:
            replies = await _replies(ws, 31)
            assert replies[0]["type"] == "welcome"
            assert [(r["type"], r["id"]) for r in replies[1:]] == [("pong", f"p{i}") for i in range(30)]
            assert await ws.send(b"".join(_ping(i) for i in range(30, 40)))
            assert [r["id"] for r in await _replies(ws, 10)] == [f"p{i}" for i in range(30, 40)]
        finally:
            await ws.aclose()


async def _closed_with(ws: RawWS, replies: int) -> tuple[list[dict], int | None]:
    got = []
    with trio.fail_after(TIMEOUT):
        try:
            while True:
                got.append(await ws.recv())
        except Closed as exc:
            return got, exc.code
        finally:
            assert len(got) <= replies, got


async def test_close_frame_ends_reading(tmp_path):
    """A close frame with a request behind it in the same write: the close is answered, the
    request after it is not."""
    async with running_server(tmp_path) as (url, _, _):
        ws = await RawWS.open(url, token("u1"))
        try:
            assert await ws.send(_ping(1) + frame_bytes(CLOSE, struct.pack("!H", 1000)) + _ping(2))
            got, code = await _closed_with(ws, 1)
            assert [r["id"] for r in got] == ["p1"] and code == 1000
        finally:
            await ws.aclose()


async def test_oversized_and_invalid_frames_behind_good_ones(tmp_path):
    """The requests before a bad frame are answered; then 1009 (over max_message_size) or
    1007 (invalid UTF-8; trio-websocket may drop the TCP connection instead)."""
    async with running_server(tmp_path, max_message_size=1024) as (url, _, _):
        for bad, codes in ((frame_bytes(TEXT, b"x" * 1025), {1009}), (frame_bytes(TEXT, b"\xff\xfe"), {1007, None}),
                           (frame_bytes(TEXT, b"x" * 600, fin=False) + frame_bytes(CONTINUATION, b"x" * 600), {1009})):
            ws = await RawWS.open(url, token("u1"))
            try:
                assert await ws.send(_ping(1) + _ping(2) + bad + _ping(3))
                got, code = await _closed_with(ws, 2)
                assert [r["id"] for r in got] == ["p1", "p2"] and code in codes
            finally:
                await ws.aclose()


def test_ack_frame_is_the_generic_reply():
    """protocol.ack builds by hand exactly what protocol.reply renders."""
    from orderlog.protocol import ack, reply

    for rid, seq, version, events, dup in (("c-1", 1, 1, ("order-placed", "stock-reserved"), False),
                                           ('q"\\é😀\u2028', 2**40, 7, (), True)):
        assert ack(rid, seq, version, events, dup) == reply("ack", rid, seq=seq, version=version,
                                                          events=list(events), duplicate=dup)


async def test_requests_behind_a_refused_refresh_are_dropped_and_nothing_crashes(tmp_path, caplog):
    """A refresh with a bad token closes with 4001 while more requests sit behind it in the same
    write: those are dropped, the reader stops on the closed socket (never waits on a closed
    descriptor, whose number the next connection reuses), and later connections work."""
    caplog.set_level("INFO", logger="orderlog")
    async with running_server(tmp_path) as (url, _, _):
        for _ in range(15):
            ws = await RawWS.open(url, token("u1"))
            try:
                refresh = frame_bytes(TEXT, json.dumps({"type": "auth", "token": "not-a-token"}).encode())
                assert await ws.send(_ping(1) + refresh + b"".join(_ping(i) for i in range(2, 60)))
                got, code = await _closed_with(ws, 1)
                assert [r["id"] for r in got] == ["p1"] and code == 4001
            finally:
                await ws.aclose()
        ws = await RawWS.open(url, token("u1"))
        try:
            assert await ws.send(_ping(7))
            assert [r["id"] for r in await _replies(ws, 1)] == ["p7"]
        finally:
            await ws.aclose()
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
