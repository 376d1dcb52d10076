"""RFC 6455 protocol errors get their close frame: 1002 (protocol error) or 1007 (invalid payload),
then the server hangs up (section 7.1.7, "Fail the WebSocket Connection").

One case per class that Autobahn|Testsuite covers in sections 5 (fragmentation), 6 (UTF-8) and
7 (close handling), plus reserved bits, reserved opcodes and unmasked frames (section 4 and 5.3),
each sent over a raw socket to the real server, after authentication and before it. Valid
frames of the same shapes (fragments with pings between them, a character split across
fragments, every valid close code) are answered normally.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
from urllib.parse import quote, urlsplit

import pytest
import trio

from orderlog.wire import FrameSplitter, Violation, valid_close_code
from test_hostile import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, Closed, RawWS, frame_bytes
from wsclient import TIMEOUT, running_server, token

PING_REQUEST = json.dumps({"type": "ping", "id": "p"}).encode()
KAPPA = "κόσμε".encode()  # Autobahn's 6.x test text


def _close(code: int, reason: bytes = b"") -> bytes:
    return frame_bytes(CLOSE, struct.pack("!H", code) + reason)


# name -> (bytes the client sends, the close code it must get)
VIOLATIONS: dict[str, tuple[bytes, int]] = {
    # section 4 / 5.3: reserved bits, reserved opcodes, an unmasked client frame
    "rsv1": (frame_bytes(TEXT, PING_REQUEST, rsv=4), 1002),
    "rsv3-on-ping": (frame_bytes(PING, b"x", rsv=1), 1002),
    "opcode-3": (frame_bytes(3, b"x"), 1002),
    "opcode-11": (frame_bytes(0xB, b""), 1002),
    "unmasked": (frame_bytes(TEXT, PING_REQUEST, masked=False), 1002),
    # section 5: fragmentation
    "fragmented-ping": (frame_bytes(PING, b"a", fin=False) + frame_bytes(CONTINUATION, b"b"), 1002),
    "fragmented-pong": (frame_bytes(PONG, b"a", fin=False) + frame_bytes(CONTINUATION, b"b"), 1002),
    "stray-continuation": (frame_bytes(CONTINUATION, PING_REQUEST), 1002),
    "stray-continuation-not-final": (frame_bytes(CONTINUATION, b"x", fin=False), 1002),
    "text-inside-fragments": (frame_bytes(TEXT, PING_REQUEST[:4], fin=False) + frame_bytes(TEXT, PING_REQUEST[4:]), 1002),
    "binary-inside-fragments": (frame_bytes(BINARY, b"ab", fin=False) + frame_bytes(BINARY, b"cd"), 1002),
    "long-ping": (frame_bytes(PING, b"p" * 126), 1002),
    # section 6: UTF-8
    "invalid-utf8": (frame_bytes(TEXT, b'{"type":"ping","id":"\xff"}'), 1007),
    "surrogate-utf8": (frame_bytes(TEXT, b"\xed\xa0\x80"), 1007),
    "invalid-utf8-first-fragment": (frame_bytes(TEXT, KAPPA + b"\xed\xa0\x80", fin=False)
                                    + frame_bytes(CONTINUATION, b"x"), 1007),
    "invalid-utf8-last-fragment": (frame_bytes(TEXT, KAPPA, fin=False) + frame_bytes(CONTINUATION, b"\xf4\x90\x80\x80"), 1007),
    "truncated-utf8-at-the-end": (frame_bytes(TEXT, b"{", fin=False) + frame_bytes(CONTINUATION, KAPPA[:1]), 1007),
    # section 7: close frames
    "close-1-byte": (frame_bytes(CLOSE, b"\x03"), 1002),
    "close-long": (frame_bytes(CLOSE, struct.pack("!H", 1000) + b"x" * 124), 1002),
    "close-invalid-reason": (_close(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007),
    **{f"close-code-{code}": (_close(code), 1002) for code in (0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535)},
}


# -- the splitter alone (sans IO) --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_the_splitter_turns_each_violation_into_its_close_code(name):
    data, code = VIOLATIONS[name]
    splitter = FrameSplitter(64 * 1024)
    items = splitter.feed(data)
    assert type(items[-1]) is Violation and items[-1].code == code, items
    assert splitter.feed(frame_bytes(TEXT, PING_REQUEST)) == []  # nothing after it is read


def test_valid_close_codes_are_the_ones_rfc_6455_lets_an_endpoint_send():
    assert [c for c in range(0, 5100) if valid_close_code(c)] == [
        1000, 1001, 1002, 1003, *range(1007, 1014), *range(3000, 5000)]


# -- over a real socket ------------------------------------------------------------------------


class Raw(RawWS):
    """test_hostile's hand-made WebSocket, opened with or without a token (no `welcome` read)."""

    @classmethod
    async def open(cls, url: str, tok: str | None) -> "Raw":
        parts = urlsplit(url)
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        query = f"?token={quote(tok, safe='')}" if tok else ""
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all((f"GET {parts.path}{query} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(stream, rest)

    async def frame(self) -> tuple[int, bytes] | None:
        """The next frame (opcode, payload), or None at the end of the TCP stream."""
        try:
            _, opcode, payload = await self.recv_frame()
        except Closed:
            return None
        return opcode, payload

    async def message(self) -> dict:
        while True:
            got = await self.frame()
            assert got is not None, "the server hung up"
            opcode, payload = got
            if opcode == TEXT:
                return json.loads(payload)
            assert opcode in (PING, PONG), (opcode, payload)

    async def close_code(self) -> tuple[int, str]:
        """Read until the close frame; return its code and reason, and check that the server then hangs up."""
        while True:
            got = await self.frame()
            assert got is not None, "TCP closed without a close frame"
            opcode, payload = got
            if opcode == CLOSE:
                break
        code, reason = struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        await self.stream.send_eof()  # as a client does once it has the server's close frame
        while (got := await self.frame()) is not None:
            raise AssertionError(f"a frame after the close frame: {got}")
        return code, reason


@pytest.fixture
async def server(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="orderlog")
    async with running_server(tmp_path) as running:
        yield running


async def test_each_protocol_violation_gets_its_close_frame_then_the_server_hangs_up(server, caplog):
    """Authenticated or not: the close frame with 1002 or 1007 arrives, then the end of the TCP stream; the
    server logs that code and no traceback, and keeps serving."""
    url = server[0]
    with trio.fail_after(60):
        for name, (data, code) in VIOLATIONS.items():
            for authenticated in (True, False):
                ws = await Raw.open(url, token("mallory") if authenticated else None)
                async with ws.stream:
                    if authenticated:
                        assert (await ws.message())["type"] == "welcome"
                    await ws.stream.send_all(data + frame_bytes(TEXT, PING_REQUEST))
                    got, reason = await ws.close_code()
                    assert got == code, (name, authenticated, got, reason)
                    assert reason, name
        ws = await Raw.open(url, token("alice"))
        async with ws.stream:
            assert (await ws.message())["type"] == "welcome"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    closes = [r.getMessage() for r in caplog.records if "event=connection.close" in r.getMessage()]
    assert sum(" code=1002 " in line for line in closes) == 2 * sum(c == 1002 for _, c in VIOLATIONS.values())
    assert sum(" code=1007 " in line for line in closes) == 2 * sum(c == 1007 for _, c in VIOLATIONS.values())


VALID = {
    "fragments-with-pings-between": frame_bytes(TEXT, PING_REQUEST[:3], fin=False) + frame_bytes(PING, b"x")
    + frame_bytes(CONTINUATION, PING_REQUEST[3:9], fin=False) + frame_bytes(PONG, b"")
    + frame_bytes(CONTINUATION, PING_REQUEST[9:]),
    "a character split across fragments": frame_bytes(
        TEXT, b'{"type":"ping","id":"' + KAPPA[:1], fin=False) + frame_bytes(CONTINUATION, KAPPA[1:] + b'"}'),
    "empty fragments": frame_bytes(TEXT, b"", fin=False) + frame_bytes(CONTINUATION, PING_REQUEST, fin=False)
    + frame_bytes(CONTINUATION, b""),
}


async def test_valid_fragments_and_close_codes_are_answered_normally(server):
    url = server[0]
    with trio.fail_after(30):
        for name, data in VALID.items():
            ws = await Raw.open(url, token("alice"))
            async with ws.stream:
                assert (await ws.message())["type"] == "welcome"
                await ws.stream.send_all(data)
                assert (await ws.message())["type"] == "pong", name
        for code in (1000, 1001, 1003, 1007, 1011, 1013, 3000, 4999):
            ws = await Raw.open(url, token("alice"))
            async with ws.stream:
                assert (await ws.message())["type"] == "welcome"
                await ws.stream.send_all(_close(code, "bye κ".encode()))
                got, _ = await ws.close_code()
                assert got == code  # the close handshake echoes the peer's code


async def test_over_tls_too(tmp_path):
    """wss: the close frame goes through the TLS stream (which cannot half-close), then the server hangs up."""
    import ssl
    from functools import partial

    from orderlog.auth import Keys
    from orderlog.service.server import serve
    from orderlog.service.settings import Settings
    from test_tls import _self_signed
    from wsclient import SECRET

    cert, key = _self_signed(tmp_path)
    settings = Settings(db=str(tmp_path / "tls.db"), host="localhost", port=0, keys=Keys("HS256", SECRET),
                        tls_cert=str(cert), tls_key=str(key))
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, settings, stop=stop, handle_signals=False))
            parts = urlsplit(url)
            tcp = await trio.open_tcp_stream(parts.hostname, parts.port)
            stream = trio.SSLStream(tcp, ssl.create_default_context(cafile=str(cert)), server_hostname="localhost")
            key64 = base64.b64encode(os.urandom(16)).decode()
            await stream.send_all((f"GET {parts.path}?token={token('alice')} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key64}\r\n"
                                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            ws = Raw(stream, rest)
            assert head.startswith(b"HTTP/1.1 101") and (await ws.message())["type"] == "welcome"
            await stream.send_all(frame_bytes(TEXT, PING_REQUEST, rsv=2))
            while (got := await ws.frame()) is not None and got[0] != CLOSE:
                pass
            assert got is not None and struct.unpack("!H", got[1][:2])[0] == 1002
            assert await ws.frame() is None  # then the server hangs up
            stop.set()
