"""The asyncio shell around the client's sans-IO session (`orderlog.session`), on `websockets`.

For services built on asyncio (FastAPI, aiohttp, Django Channels); `pip install 'orderlog[asyncio]'`.
The API is the trio client's:

    from orderlog.client.asyncio import connect

    async with connect(url, token) as c:   # token: a JWT, or a provider (sync or async function)
        ack = await c.command("place_order", order_id="o-1", data={"items": [{"sku": "kibble", "quantity": 1}]})
        async for event in c.subscribe("orders", since=0):
            print(event["seq"], event["type"])

The client runs as one task of the loop while the block lasts; it reconnects, resubscribes and
resends on its own, with the session's promises (no gap, no duplicate, no doubled command).
This module loads no trio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

from websockets.asyncio.client import connect as open_websocket
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ..session import (
    BACKOFF_CAP, BACKOFF_START, AuthenticationFailed, Deliver, OrderlogError, Output, Reply, ResyncRequired,
    ServerError, Session, Status, SubscriptionEnded, TokenUnavailable, error_from,
)
from .common import Requests, TokenSource, Urls, fresh_token, why

log = logging.getLogger("orderlog.client")

EVENT_BUFFER = 1000  # events buffered per subscription before the reader waits for the caller
MAX_MESSAGE = 4 * 1024 * 1024  # snapshot frames are at most 256 KiB; events far less
_END = object()  # the end of a subscription's queue


class _Stream:
    """Where a subscription's frames wait for the caller."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(EVENT_BUFFER)
        self.error: OrderlogError | None = None
        self.ended = False

    def end(self, error: OrderlogError | None) -> None:
        self.error, self.ended = error, True
        try:
            self.queue.put_nowait(_END)
        except asyncio.QueueFull:
            pass  # the reader sees `ended` once it has drained the queue


class Client(Requests):
    """A client that survives disconnects: `connect()` runs it; `run()` keeps it connected."""

    def __init__(self, url: str | Sequence[str], token: TokenSource, *, backoff_start: float = BACKOFF_START,
                 backoff_cap: float = BACKOFF_CAP, on_status: Callable[[str], None] | None = None):
        self.urls = Urls(url)  # several nodes of one log: rotated through on every reconnect
        self._token = token
        self.on_status = on_status or (lambda text: log.info("%s", text))
        self.session = Session(backoff_start=backoff_start, backoff_cap=backoff_cap, refreshable=callable(token))
        self._ws: Any = None
        self._send_lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future] = {}
        self._streams: dict[str, _Stream] = {}

    @property
    def url(self) -> str:
        """The server URL the client is connected to (or tries next)."""
        return self.urls.current

    @property
    def welcome(self) -> dict | None:
        return self.session.welcome

    @property
    def log_id(self) -> str | None:
        return self.session.log_id

    @property
    def connected(self) -> bool:
        return self._ws is not None

    # public API ---------------------------------------------------------------------------

    async def request(self, frame: dict) -> dict:
        """Send any request and wait for its reply; resent after a reconnect until answered."""
        if self.session.fatal is not None:
            raise self.session.fatal
        request_id = self.session.request(frame)
        reply = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        try:
            await self._flush()
            message = await reply
        finally:
            self._waiting.pop(request_id, None)
            self.session.forget(request_id)
        if message.get("type") == "error":
            raise error_from(message)
        return message

    async def subscribe(self, channel: str, since: int | None = None, snapshot: bool = False, *,
                        anchor: dict | None = None, log_id: str | None = None) -> AsyncIterator[dict]:
        """The channel's events, in seq order without gap or duplicate, across reconnects (the
        trio client's `subscribe`: `snapshot`, `since`, `anchor`, `log_id` and ResyncRequired
        mean the same)."""
        if self.session.fatal is not None:
            raise self.session.fatal
        self.session.subscribe(channel, since, snapshot, anchor=anchor, log_id=log_id)
        stream = self._streams[channel] = _Stream()
        try:
            await self._flush()
            while not (stream.ended and stream.queue.empty()):
                item = await stream.queue.get()
                if item is _END:
                    break
                yield item
            if stream.error is not None:
                raise stream.error
        finally:
            if self._streams.get(channel) is stream:
                del self._streams[channel]
            stream.ended = True
            while not stream.queue.empty():  # wakes a reader waiting to put into a full queue
                stream.queue.get_nowait()
            self.session.unsubscribe(channel)
            try:
                async with asyncio.timeout(1):
                    await self._flush()
            except TimeoutError:
                pass

    # the connection loop ------------------------------------------------------------------

    async def run(self, started: asyncio.Future | None = None) -> None:
        """Keep a connection up until cancelled (or the token is refused); `started` gets the
        client once the first connection is welcomed."""
        while True:
            code = reason = None
            try:
                try:
                    token = await fresh_token(self._token)
                except Exception as exc:
                    if not self.session.started:
                        raise exc if isinstance(exc, TokenUnavailable) else TokenUnavailable(str(exc)) from exc
                    raise ConnectionError(f"the token provider failed: {exc}") from exc
                async with open_websocket(self.url, additional_headers={"Authorization": f"Bearer {token}"},
                                          max_size=MAX_MESSAGE, compression=None) as ws:
                    welcome = json.loads(await ws.recv())
                    await self._handle(self.session.connection_made(welcome, time.time()))
                    self._ws = ws
                    self.on_status(f"connected to {self.url} (head {welcome.get('head')})")
                    await self._flush()
                    if started is not None and not started.done():
                        started.set_result(self)
                    await self._read(ws)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else None
            except (OSError, InvalidHandshake) as exc:
                self.on_status(f"cannot connect: {why(exc)}")
            finally:
                self._ws = None
            if self.session.connected or code is not None:
                await self._handle(self.session.connection_lost(time.time(), code, reason))
            if self.session.fatal is not None:
                raise self.session.fatal from None
            self.urls.next()
            delay = self.session.reconnect_delay(time.time())
            where = f" to {self.url}" if len(self.urls.all) > 1 else ""
            self.on_status(f"reconnecting in {delay:.1f} s{where}")
            await asyncio.sleep(delay)

    async def _read(self, ws) -> None:
        while True:
            due = self.session.refresh_due(time.time())
            try:
                async with asyncio.timeout(due):  # recv() is safe to cancel: no message is lost
                    text = await ws.recv()
            except TimeoutError:
                await self._refresh()
                continue
            await self._handle(self.session.receive(json.loads(text)))
            await self._flush()

    async def _refresh(self) -> None:
        try:
            token = await fresh_token(self._token)
        except Exception as exc:  # the server closes with `token expired`; the reconnect asks again
            self.on_status(f"no fresh token: {exc}")
            self.session.refresh_failed()
            return
        self.session.refresh(token)
        await self._flush()

    async def _flush(self) -> None:
        async with self._send_lock:
            for frame in self.session.frames_to_send():
                ws = self._ws
                if ws is None:
                    return  # resent on the reconnect
                try:
                    await ws.send(json.dumps(frame))
                except ConnectionClosed:
                    return  # the connection loop resends what matters

    async def _handle(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Deliver):
                stream = self._streams.get(out.channel)
                if stream is not None and not stream.ended:
                    await stream.queue.put(out.frame)
            elif isinstance(out, Reply):
                reply = self._waiting.get(out.request_id)
                if reply is not None and not reply.done():
                    reply.set_result(out.frame)
            elif isinstance(out, SubscriptionEnded):
                stream = self._streams.get(out.channel)
                if stream is not None:
                    stream.end(out.error)
            elif isinstance(out, Status):
                self.on_status(out.text)
            elif isinstance(out, ServerError):
                log.warning("server error: %s %s", out.frame.get("code"), out.frame.get("message"))


@asynccontextmanager
async def connect(url: str | Sequence[str], token: TokenSource, **options: Any) -> AsyncIterator[Client]:
    """A connected Client for the duration of the block (it reconnects on its own, in a task).

    `url` is the server's URL, or a list of the URLs of several nodes of one log: the client
    moves to the next one after every failed connect or lost connection. `token` is a JWT, or a
    provider: a function (sync or async) that returns one, called before every connect and
    before the token expires (sent in band). A refused token raises AuthenticationFailed; a
    provider that fails before the first connect, TokenUnavailable.
    """
    client = Client(url, token, **options)
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(client.run(started), name=f"orderlog client {client.url}")
    failed = False
    try:
        await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            task.result()  # raises what ended it (AuthenticationFailed, TokenUnavailable, ...)
        yield client
    except BaseException:
        failed = True
        raise
    finally:
        task.cancel()
        await asyncio.wait({task})
        if not failed and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # a token refused while the block ran


__all__ = ["AuthenticationFailed", "Client", "OrderlogError", "ResyncRequired", "TokenUnavailable", "connect"]
