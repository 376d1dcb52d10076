"""The trio shell around the client's sans-IO session (`orderlog.session`), on trio-websocket.

    async with connect(url, token) as c:   # token: a JWT, or a provider (sync or async function)
        ack = await c.command("place_order", order_id="o-1", data={"items": [{"sku": "kibble", "quantity": 1}]})
        async for event in c.subscribe("orders", since=0):
            print(event["seq"], event["type"])

What it promises (no gap, no duplicate, no doubled command across reconnects) is the session's;
this module only moves frames between the socket and the session, and the session's events to
the callers' tasks.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from ..session import (
    BACKOFF_CAP, BACKOFF_START, AuthenticationFailed, Deliver, OrderlogError, Output, Reply, ResyncRequired,
    ServerError, Session, Status, SubscriptionEnded, TokenUnavailable, error_from,
)
from .common import Requests, TokenSource, Urls, fresh_token, single, tail_lines, why

log = logging.getLogger("orderlog.client")

EVENT_BUFFER = 1000  # events buffered per subscription before the reader waits for the caller
MAX_MESSAGE = 4 * 1024 * 1024  # snapshot frames are at most 256 KiB; events far less


class _Stream:
    """Where a subscription's frames wait for the caller."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[dict](EVENT_BUFFER)
        self.error: OrderlogError | None = None


class Client(Requests):
    """A client that survives disconnects: `connect()` runs it; `run()` keeps it connected."""

    def __init__(self, url: str | Sequence[str], token: TokenSource, *, backoff_start: float = BACKOFF_START,
                 backoff_cap: float = BACKOFF_CAP, on_status: Callable[[str], None] | None = None):
        self.urls = Urls(url)  # several nodes of one log: rotated through on every reconnect
        self._token = token
        self.on_status = on_status or (lambda text: log.info("%s", text))
        self.session = Session(backoff_start=backoff_start, backoff_cap=backoff_cap, refreshable=callable(token))
        self._ws = None
        self._send_lock = trio.Lock()
        self._waiting: dict[str, trio.Event] = {}
        self._replies: dict[str, dict] = {}
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
    def fatal(self) -> OrderlogError | None:
        return self.session.fatal

    @property
    def _subs(self):  # the session's subscriptions by channel (their `last` is the resume cursor)
        return self.session.subscriptions

    # public API ---------------------------------------------------------------------------

    async def request(self, frame: dict) -> dict:
        """Send any request and wait for its reply; resent after a reconnect until answered."""
        if self.session.fatal is not None:
            raise self.session.fatal
        request_id = self.session.request(frame)
        done = self._waiting[request_id] = trio.Event()
        try:
            await self._flush()
            await done.wait()
        finally:
            self._waiting.pop(request_id, None)
            self.session.forget(request_id)
        reply = self._replies.pop(request_id, {})
        if reply.get("type") == "error":
            raise error_from(reply)
        return reply

    async def subscribe(self, channel: str, since: int | None = None, snapshot: bool = False, *,
                        anchor: dict | None = None, log_id: str | None = None) -> AsyncIterator[dict]:
        """The channel's events, in seq order without gap or duplicate, across reconnects.

        With `snapshot` (and no `since`): first the `snapshot` frames (dicts of type "snapshot",
        their `rows` the channel's rows as of their `seq` N), then the events after N. A frame
        that carries `total` starts a snapshot: if the connection broke before the `last` frame,
        the snapshot starts over after the reconnect, and the caller drops the rows it had.
        Once it is complete, a reconnect resumes from the last seq, as with `since`.

        A caller that kept state from an earlier run passes the last seq it holds as `since`,
        with `anchor` ({seq, hash} of the newest event it holds with a hash) and the `log_id`
        it came from. Raises ResyncRequired when the server's log is not the one the caller's
        history comes from (before or after a reconnect): start over from since 0 (or a snapshot).
        """
        if self.session.fatal is not None:
            raise self.session.fatal
        self.session.subscribe(channel, since, snapshot, anchor=anchor, log_id=log_id)
        stream = self._streams[channel] = _Stream()
        try:
            await self._flush()
            async with stream.receive:
                async for event in stream.receive:
                    yield event
            if stream.error is not None:
                raise stream.error
        finally:
            if self._streams.get(channel) is stream:
                del self._streams[channel]
            self.session.unsubscribe(channel)
            with trio.move_on_after(1):
                await self._flush()

    # the connection loop ------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up until cancelled (or the token is refused)."""
        started = False
        while True:
            code = reason = None
            try:
                try:
                    token = await fresh_token(self._token)
                except Exception as exc:
                    if not started:
                        raise exc if isinstance(exc, TokenUnavailable) else TokenUnavailable(str(exc)) from exc
                    raise OSError(f"the token provider failed: {exc}") from exc
                async with open_websocket_url(self.url, extra_headers=[(b"authorization", f"Bearer {token}".encode())],
                                              max_message_size=MAX_MESSAGE) as ws:
                    welcome = json.loads(await ws.get_message())
                    await self._handle(self.session.connection_made(welcome, time.time()))
                    self._ws = ws
                    self.on_status(f"connected to {self.url} (head {welcome.get('head')})")
                    await self._flush()
                    if not started:
                        started = True
                        task_status.started(self)
                    await self._read(ws)
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else None
                reason = exc.reason.reason if exc.reason is not None else None
            except (OSError, HandshakeError, ConnectionRejected, trio.BrokenResourceError) as exc:
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
            await trio.sleep(delay)

    async def _read(self, ws) -> None:
        while True:
            due = self.session.refresh_due(time.time())
            with trio.move_on_after(due if due is not None else float("inf")) as waiting:
                text = await ws.get_message()
            if waiting.cancelled_caught:
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
                    await ws.send_message(json.dumps(frame))
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the connection loop resends what matters

    async def _handle(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Deliver):
                stream = self._streams.get(out.channel)
                if stream is None:
                    continue
                try:
                    await stream.send.send(out.frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._streams.pop(out.channel, None)
                    self.session.unsubscribe(out.channel, tell_server=False)
            elif isinstance(out, Reply):
                done = self._waiting.get(out.request_id)
                if done is not None:
                    self._replies[out.request_id] = out.frame
                    done.set()
            elif isinstance(out, SubscriptionEnded):
                stream = self._streams.get(out.channel)
                if stream is not None:
                    stream.error = out.error
                    stream.send.close()
            elif isinstance(out, Status):
                self.on_status(out.text)
            elif isinstance(out, ServerError):
                log.warning("server error: %s %s", out.frame.get("code"), out.frame.get("message"))


@asynccontextmanager
async def connect(url: str | Sequence[str], token: TokenSource, **options: Any) -> AsyncIterator[Client]:
    """A connected Client for the duration of the block (it reconnects on its own).

    `url` is the server's URL, or a list of the URLs of several nodes of one log: the client
    moves to the next one after every failed connect or lost connection. `token` is a JWT, or a
    provider: a function (sync or async) that returns one, called before every connect and
    before the token expires (sent in band). A refused token raises AuthenticationFailed itself,
    not inside an exception group.
    """
    try:
        async with trio.open_nursery() as nursery:
            client = Client(url, token, **options)
            await nursery.start(client.run)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single(group)


async def tail(url: str | Sequence[str], token: TokenSource, channel: str, since: int | None,
               emit: Callable[[str], None], note: Callable[[str], None], count: int | None = None,
               snapshot: bool = False) -> int:
    """`orderlog tail`: print the channel's events as JSON lines; 0 when done, 1 on a refusal.

    With `snapshot`, the rows as of a seq come first, one `{"order": ROW}` or `{"stock": ROW}`
    line each (the lines of `orderlog state`), then the events after that seq (`count` counts
    events only)."""
    try:
        async with connect(url, token, on_status=note) as client:
            return await tail_lines(client.subscribe(channel, since, snapshot=snapshot), channel, emit, note, count)
    except ResyncRequired as exc:
        note(f"error: {exc}: the server's log is not the one the lines above came from (another log, "
             "a restored backup or a failover); run again with --since 0")
        return 1
    except (OrderlogError, TokenUnavailable) as exc:
        note(f"error: {exc}")
        return 1


__all__ = ["AuthenticationFailed", "Client", "OrderlogError", "ResyncRequired", "TokenUnavailable", "connect",
           "tail", "why"]
