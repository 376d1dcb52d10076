"""Helpers for the live-service tests: a real server on port 0 and real WebSocket clients.

Nothing here mocks trio, trio-websocket or SQLite. Every wait has a timeout, so a server that
hangs makes a test fail instead of blocking the suite.
"""

from __future__ import annotations

import itertools
import json
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import quote, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url, wrap_client_stream

import frameschema
from orderlog.auth import Keys, mint
from orderlog.service.server import serve
from orderlog.service.settings import Settings

SECRET = "test-secret-0123456789-abcdefghij"
TIMEOUT = 5.0  # seconds any single network wait may take before the test fails
START_TIMEOUT = 10.0

_ids = itertools.count(1)


def next_id(prefix: str = "r") -> str:
    """A request id unique within the test session."""
    return f"{prefix}-{next(_ids)}"


def token(sub: str, role: str = "customer", ttl: float = 300, secret: str = SECRET, now: float | None = None) -> str:
    """An HS256 token for `sub` with `role`, valid for `ttl` seconds."""
    return mint(sub, role, ttl, time.time() if now is None else now, secret, "HS256")


@asynccontextmanager
async def running_server(
    tmp_path: Path,
    *,
    db: Path | str | None = None,
    secret: str = SECRET,
    stop: trio.Event | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[str, str, Settings]]:
    """Run the real server on port 0 with a SQLite file in tmp_path; yield (url, secret, settings).

    `settings` are Settings fields (keys defaults to HS256 with `secret`). The server is stopped
    on exit (through `stop`, which the caller may also set itself).
    """
    settings.setdefault("keys", Keys("HS256", secret))
    config = Settings(db=str(db or tmp_path / "orderlog.db"), port=0, **settings)
    stop = stop if stop is not None else trio.Event()
    finished = trio.Event()

    async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(config, stop=stop, handle_signals=False, task_status=task_status)
        finally:
            finished.set()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_TIMEOUT):
            url = await nursery.start(run)
        try:
            yield url, secret, config
        finally:
            stop.set()
            # serve() closes every connection and returns; it must not hang.
            with trio.move_on_after(START_TIMEOUT) as scope:
                await finished.wait()
            if scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                raise AssertionError(f"the server did not stop within {START_TIMEOUT} s of stop.set()")


def with_token(url: str, tok: str | None) -> str:
    return url if tok is None else f"{url}?token={quote(tok, safe='')}"


@asynccontextmanager
async def connect(
    url: str,
    tok: str | None = None,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    queue: int = 64,
) -> AsyncIterator[WebSocketConnection]:
    """A raw WebSocket connection, the token (if any) in the query string."""
    async with open_websocket_url(
        with_token(url, tok), extra_headers=headers, message_queue_size=queue,
        connect_timeout=TIMEOUT, disconnect_timeout=TIMEOUT, max_message_size=16 * 2**20,
    ) as ws:
        yield ws


def redacted(event: dict[str, Any]) -> dict[str, Any]:
    """The EVENT object `event` (a stock move of another customer's order) as a customer gets it
    (docs/protocol.md section 4, "Redacted events")."""
    data = {k: v for k, v in event["data"].items() if k != "order_id"}
    return {**event, "actor": None, "command_id": None, "hash": None, "data": data, "redacted": True}


def decode(frame: str | bytes) -> dict[str, Any]:
    """A frame from the server as a JSON object. It must conform to docs/asyncapi.yaml: conftest
    checks every frame recorded here when the test ends (tests/frameschema.py)."""
    assert isinstance(frame, str), f"server sent a binary frame: {frame!r}"
    message = json.loads(frame)
    assert isinstance(message, dict) and isinstance(message.get("type"), str), message
    frameschema.record(frame, message)
    return message


async def recv_json(ws: WebSocketConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next frame as a JSON object; fail if none comes within `timeout`."""
    with trio.fail_after(timeout):
        return decode(await ws.get_message())


async def send_json(ws: WebSocketConnection, message: Any) -> None:
    with trio.fail_after(TIMEOUT):
        await ws.send_message(json.dumps(message))


async def expect_close(ws: WebSocketConnection, timeout: float = TIMEOUT) -> tuple[int, str | None]:
    """Read (and drop) frames until the server closes; return (code, reason)."""
    code, reason, _ = await expect_close_frames(ws, timeout)
    return code, reason


async def expect_close_frames(ws: WebSocketConnection, timeout: float = TIMEOUT) -> tuple[int, str | None, list]:
    """Read frames until the server closes; return (code, reason, frames read before)."""
    frames = []
    with trio.fail_after(timeout):
        while True:
            try:
                frames.append(decode(await ws.get_message()))
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason.code, exc.reason.reason, frames


async def collect_until(ws: WebSocketConnection, predicate: Callable[[dict], bool], timeout: float = TIMEOUT) -> list[dict]:
    """Frames up to and including the first one matching `predicate`."""
    frames = []
    with trio.fail_after(timeout):
        while True:
            frames.append(decode(await ws.get_message()))
            if predicate(frames[-1]):
                return frames


async def assert_quiet(ws: WebSocketConnection, seconds: float = 0.3) -> None:
    """Fail if the server sends anything within `seconds`."""
    with trio.move_on_after(seconds):
        frame = await ws.get_message()
        raise AssertionError(f"unexpected frame: {frame!r}")


class Session:
    """An authenticated connection: requests by id, everything else kept in order in `inbox`."""

    def __init__(self, ws: WebSocketConnection, welcome: dict[str, Any]):
        self.ws = ws
        self.welcome = welcome
        self.inbox: list[dict[str, Any]] = []  # frames read while waiting for another reply

    async def send(self, message: dict[str, Any]) -> None:
        await send_json(self.ws, message)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self.inbox:
            return self.inbox.pop(0)
        return await recv_json(self.ws, timeout)

    async def request(self, message: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send `message` with a fresh id (unless it has one); return the reply with that id."""
        message = dict(message)
        message.setdefault("id", next_id())
        await self.send(message)
        return await self.reply_to(message["id"], timeout)

    async def reply_to(self, request_id: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        for i, frame in enumerate(self.inbox):
            if frame.get("id") == request_id and frame["type"] not in EVENT_TYPES:
                return self.inbox.pop(i)
        with trio.fail_after(timeout):
            while True:
                frame = decode(await self.ws.get_message())
                if frame.get("id") == request_id and frame["type"] not in EVENT_TYPES:
                    return frame
                self.inbox.append(frame)

    async def command(self, name: str, order_id: str | None = None, data: dict | None = None,
                      expected_version: int | None = None, command_id: str | None = None) -> dict[str, Any]:
        """Send a command; return its `ack` or `error`."""
        message: dict[str, Any] = {"type": "command", "id": command_id or next_id("c"), "name": name}
        if order_id is not None:
            message["order_id"] = order_id
        if data is not None:
            message["data"] = data
        if expected_version is not None:
            message["expected_version"] = expected_version
        return await self.request(message)

    async def ok(self, name: str, order_id: str | None = None, data: dict | None = None, **kw: Any) -> dict[str, Any]:
        """A command that must be acked."""
        reply = await self.command(name, order_id, data, **kw)
        assert reply["type"] == "ack", (name, order_id, data, reply)
        return reply

    async def subscribe(self, channel: str, since: int | None = None, **extra: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "subscribe", "channel": channel, **extra}
        if since is not None:
            message["since"] = since
        return await self.request(message)

    async def until(self, predicate: Callable[[dict], bool], timeout: float = TIMEOUT) -> list[dict]:
        """Frames (inbox first) up to and including the first matching `predicate`."""
        frames = []
        with trio.fail_after(timeout):
            while True:
                frames.append(await self.recv(timeout))
                if predicate(frames[-1]):
                    return frames

    async def live(self, channel: str, timeout: float = TIMEOUT) -> tuple[list[dict], dict]:
        """The frames of `channel` up to its `live` marker: (events, live)."""
        frames = await self.until(lambda f: f["type"] == "live" and f["channel"] == channel, timeout)
        return [f for f in frames[:-1] if f.get("channel") == channel and f["type"] != "live"], frames[-1]

    async def events(self, channel: str, count: int, timeout: float = TIMEOUT) -> list[dict]:
        """The next `count` events of `channel` (other frames are kept in the inbox)."""
        got: list[dict] = []
        kept: list[dict] = []
        with trio.fail_after(timeout):
            while len(got) < count:
                frame = await self.recv(timeout)
                if frame["type"] in EVENT_TYPES and frame.get("channel") == channel:
                    got.append(frame)
                else:
                    kept.append(frame)
        self.inbox[:0] = kept
        return got

    async def ping(self) -> dict[str, Any]:
        reply = await self.request({"type": "ping"})
        assert reply["type"] == "pong", reply
        return reply


EVENT_TYPES = frozenset({
    "stock-added", "order-created", "stock-reserved", "order-updated", "order-approved", "order-shipped",
    "stock-shipped", "order-delivered", "order-cancelled", "stock-released",
})


@asynccontextmanager
async def session(url: str, sub: str, role: str = "customer", *, secret: str = SECRET, ttl: float = 300,
                  queue: int = 1024) -> AsyncIterator[Session]:
    """A connection authenticated by query token, its `welcome` already read."""
    async with connect(url, token(sub, role, ttl, secret), queue=queue) as ws:
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome", welcome
        yield Session(ws, welcome)


async def stock_up(client: Session, skus: dict[str, int]) -> None:
    """add_stock for each sku (client must be staff)."""
    for sku, quantity in skus.items():
        await client.ok("add_stock", data={"sku": sku, "quantity": quantity})


@asynccontextmanager
async def raw_connection(url: str, tok: str, *, rcvbuf: int | None = None,
                         queue: int = 1024) -> AsyncIterator[tuple[WebSocketConnection, trio.SocketStream]]:
    """A WebSocket over a TCP stream we hold, so a test can drop the TCP connection abruptly
    (`await stream.aclose()`, no close frame) or shrink the receive buffer (`rcvbuf`)."""
    parts = urlsplit(url)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
    stream = trio.SocketStream(sock)
    try:
        with trio.fail_after(TIMEOUT):
            await sock.connect((parts.hostname, parts.port))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(TIMEOUT):
                ws = await wrap_client_stream(nursery, stream, f"{parts.hostname}:{parts.port}",
                                              f"{parts.path}?token={quote(tok, safe='')}",
                                              message_queue_size=queue, max_message_size=16 * 2**20)
            try:
                yield ws, stream
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
