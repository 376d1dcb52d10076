"""The load generator's client side: a minimal WebSocket client on raw non-blocking sockets,
and the integrity checker every scenario runs over what it received.

Rules of this file: no trio, no json on the hot path. One `Loop` per process multiplexes many
connections with `selectors` (epoll). The client writes its own handshake and frames (client
frames are masked, with a 4-byte key applied as one big-integer XOR), and parses server frames
in place in a per-connection `bytearray`. An event frame is recognised by one anchored regex
on its fixed prefix (`{"type":…,"channel":…,"seq":N,"prev":M,"stream":…`), so a delivery
costs a header parse and one regex match; anything else (welcome, subscribed, live, ack,
error) is rare enough to go through `json.loads`.

`Chain` is the checker: on one subscription each event's `prev` must equal the seq received
before it (initially the `since` of `subscribed`) and seqs must strictly increase, so a gap,
a duplicate or a reordering cannot pass unnoticed.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import selectors
import socket
import struct
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import quote, urlsplit

# {"type":T,"channel":C,"seq":N,"prev":M,"stream":S — the prefix every event frame starts with.
EVENT_RE = re.compile(rb'\{"type":"([^"]+)","channel":"([^"]+)","seq":(\d+),"prev":(\d+),"stream":"([^"]*)"')
NOTE_RE = re.compile(rb'"note":"t=([0-9.]+)"')  # the driver's send time, embedded in place_order
RECV_BYTES = 256 * 1024
HANDSHAKES_IN_FLIGHT = 64  # per process: gentle on the server's accept backlog

OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class BenchError(Exception):
    """The load generator could not do its job (connection refused, handshake failed...)."""


# -- frames ----------------------------------------------------------------------------------------


def masked(payload: bytes) -> bytes:
    """`payload` XOR a random 4-byte key, prefixed by the key (RFC 6455 section 5.3)."""
    n = len(payload)
    key = random.getrandbits(32).to_bytes(4, "big")
    if not n:
        return key
    stream = (key * ((n + 3) // 4))[:n]
    return key + (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return header + masked(payload)


def text_frame(message: dict) -> bytes:
    return client_frame(json.dumps(message, separators=(",", ":")).encode())


def unmask(data: bytes) -> bytes:
    """Undo `masked` (for tests and the baseline's sanity checks)."""
    key, payload = data[:4], data[4:]
    n = len(payload)
    if not n:
        return b""
    stream = (key * ((n + 3) // 4))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


# -- the checker ---------------------------------------------------------------------------------


class Chain:
    """One subscription's delivery check: prev == last seq held, seq > prev."""

    __slots__ = ("channel", "last", "count", "error", "first", "live")

    def __init__(self, channel: str, since: int):
        self.channel = channel
        self.last = since
        self.count = 0
        self.error: str | None = None
        self.first = since
        self.live: int | None = None

    def feed(self, seq: int, prev: int) -> bool:
        if prev != self.last or seq <= prev:
            if self.error is None:
                if prev != self.last:
                    kind = "gap" if prev > self.last else "duplicate or reorder"
                    self.error = f"{self.channel}: {kind}: event {seq} has prev {prev}, but the last seq received was {self.last}"
                else:
                    self.error = f"{self.channel}: seq {seq} does not follow prev {prev}"
            self.last = max(self.last, seq)
            return False
        self.last = seq
        self.count += 1
        return True


# -- connections and the loop ----------------------------------------------------------------------


def handshake_request(url: str, token: str | None) -> tuple[tuple[str, int], bytes]:
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise BenchError(f"only ws:// URLs are supported by the load generator, not {url!r}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    query = parts.query
    if token:
        query = (query + "&" if query else "") + "token=" + quote(token, safe="")
    target = path + ("?" + query if query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    return (host, port), request


class Conn:
    """One WebSocket connection driven by a Loop; `on_text(conn, buf, start, end)` gets frames."""

    __slots__ = ("loop", "sock", "request", "state", "buf", "out", "on_text", "on_open", "frag", "frag_op",
                 "closed", "close_info", "data", "chains", "user", "wants_write", "opened_at")

    def __init__(self, loop: "Loop", request: bytes, on_text: Callable, on_open: Callable | None, data: Any):
        self.loop = loop
        self.sock: socket.socket | None = None
        self.request = request
        self.state = "queued"
        self.buf = bytearray()
        self.out = bytearray()
        self.on_text = on_text
        self.on_open = on_open
        self.frag: bytearray | None = None
        self.frag_op = 0
        self.closed = False
        self.close_info: str | None = None
        self.data = data
        self.chains: dict[bytes, Chain] = {}
        self.user = ""
        self.wants_write = False
        self.opened_at = 0.0

    # sending ---------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.out or self.state != "open":
            self.out += frame
            return
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(f"send failed: {exc}")
            return
        if sent < len(frame):
            self.out += frame[sent:]
            self._want_write(True)

    def send_json(self, message: dict) -> None:
        self.send(text_frame(message))

    def _want_write(self, on: bool) -> None:
        if on != self.wants_write and not self.closed:
            self.wants_write = on
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
            self.loop.sel.modify(self.sock, events, self)

    def _flush(self) -> None:
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            del self.out[:sent]
        if not self.out:
            self._want_write(False)

    # receiving -------------------------------------------------------------------------

    def readable(self) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"recv failed: {exc}")
            return
        if not data:
            self._lost("connection closed by the server")
            return
        buf = self.buf
        buf += data
        if self.state == "handshake":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._lost("handshake response too long")
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                status = head.split(b"\r\n", 1)[0].decode("latin-1")
                self._lost(f"handshake refused: {status}")
                return
            self.state = "open"
            self.opened_at = time.time()
            self.loop.handshake_done(self)
            if self.out:
                self._want_write(True)
            if self.on_open is not None:
                self.on_open(self)
        self._parse()

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        size = len(buf)
        on_text = self.on_text
        while size - pos >= 2:
            b0 = buf[pos]
            n = buf[pos + 1]
            if n & 0x80:
                self._lost("protocol error: the server sent a masked frame")
                return
            n &= 0x7F
            start = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + n
            if end > size:
                break
            opcode = b0 & 0x0F
            if opcode == OP_TEXT and b0 & 0x80:
                on_text(self, buf, start, end)
            else:
                self._control(b0, opcode, buf, start, end)
                if self.closed:
                    return
            pos = end
        if pos:
            del buf[:pos]

    def _control(self, b0: int, opcode: int, buf: bytearray, start: int, end: int) -> None:
        if opcode == OP_PING:
            self.send(client_frame(bytes(buf[start:end]), OP_PONG))
        elif opcode == OP_CLOSE:
            code = int.from_bytes(buf[start : start + 2], "big") if end - start >= 2 else 1005
            reason = bytes(buf[start + 2 : end]).decode("utf-8", "replace")
            self._lost(f"closed by the server: {code} {reason}")
        elif opcode in (OP_TEXT, OP_BIN):  # first fragment
            self.frag = bytearray(buf[start:end])
            self.frag_op = opcode
        elif opcode == OP_CONT and self.frag is not None:
            self.frag += buf[start:end]
            if b0 & 0x80:
                whole, self.frag = self.frag, None
                if self.frag_op == OP_TEXT:
                    self.on_text(self, whole, 0, len(whole))

    # lifecycle ---------------------------------------------------------------------------

    def _lost(self, why: str) -> None:
        if self.closed:
            return
        was = self.state
        self.closed = True
        self.close_info = why
        self.loop.lost(self, was)

    def close(self) -> None:
        """Close without a closing handshake (the bench is done with this connection)."""
        if not self.closed:
            self.closed = True
            self.close_info = "closed by the bench"
            self.loop.lost(self, self.state, quiet=True)


class Loop:
    """Many connections in one process, multiplexed with selectors; handshakes throttled."""

    def __init__(self, url: str, handshakes_in_flight: int = HANDSHAKES_IN_FLIGHT, rcvbuf: int | None = None):
        self.url = url
        self.sel = selectors.DefaultSelector()
        self.queued: deque[Conn] = deque()
        self.handshaking = 0
        self.limit = handshakes_in_flight
        self.rcvbuf = rcvbuf
        self.opened = 0
        self.errors: list[str] = []
        self.conns: list[Conn] = []
        self.extra: dict[int, Callable[[], None]] = {}

    def open(self, token: str | None, on_text: Callable, on_open: Callable | None = None, data: Any = None,
             user: str = "") -> Conn:
        _, request = handshake_request(self.url, token)
        conn = Conn(self, request, on_text, on_open, data)
        conn.user = user
        self.conns.append(conn)
        self.queued.append(conn)
        self._start_queued()
        return conn

    def _start_queued(self) -> None:
        address, _ = handshake_request(self.url, None)
        while self.queued and self.handshaking < self.limit:
            conn = self.queued.popleft()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            conn.sock = sock
            conn.state = "connecting"
            self.handshaking += 1
            err = sock.connect_ex(address)
            if err not in (0, errno.EINPROGRESS):
                conn._lost(f"connect failed: {os.strerror(err)}")
                continue
            self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def handshake_done(self, conn: Conn) -> None:
        self.handshaking -= 1
        self.opened += 1
        self._start_queued()

    def lost(self, conn: Conn, state: str, quiet: bool = False) -> None:
        if state in ("connecting", "handshake"):
            self.handshaking -= 1
        if conn.sock is not None:
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
        if not quiet:
            self.errors.append(conn.close_info or "lost")
        self._start_queued()

    def watch(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call `callback` when `fileobj` (e.g. a multiprocessing pipe) is readable."""
        self.sel.register(fileobj, selectors.EVENT_READ, callback)

    def step(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            conn = key.data
            if not isinstance(conn, Conn):
                conn()
                continue
            if conn.closed:
                continue
            if conn.state == "connecting":
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    conn._lost(f"connect failed: {os.strerror(err)}")
                    continue
                conn.state = "handshake"
                conn.sock.send(conn.request)  # a few hundred bytes into an empty buffer
                self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
                continue
            if mask & selectors.EVENT_READ:
                conn.readable()
            if mask & selectors.EVENT_WRITE and not conn.closed:
                conn._flush()

    def run_until(self, done: Callable[[], bool], deadline: float, tick: Callable[[], float | None] | None = None) -> bool:
        """Run until `done()` or time.time() >= deadline; `tick()` may return its next wake-up delay."""
        while not done():
            now = time.time()
            if now >= deadline:
                return False
            timeout = min(0.05, deadline - now)
            if tick is not None:
                wait = tick()
                if wait is not None:
                    timeout = max(0.0, min(timeout, wait))
            self.step(timeout)
        return True

    def pause(self, conn: Conn) -> None:
        """Stop reading from `conn` (its bytes pile up in the kernel, then at the server)."""
        self.sel.unregister(conn.sock)

    def resume(self, conn: Conn) -> None:
        self.sel.register(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0), conn)

    def close(self) -> None:
        for conn in self.conns:
            if not conn.closed:
                conn.close()
        self.sel.close()


def parse_reply(buf: bytearray, start: int, end: int) -> dict:
    try:
        return json.loads(bytes(buf[start:end]))
    except ValueError:
        return {"type": "?unparsable", "text": bytes(buf[start:end][:200]).decode("utf-8", "replace")}
