"""A trio client for orderlog that survives disconnects.

    async with client.connect(url, token) as c:
        ack = await c.command("place_order", order_id="o-1", data={"items": [{"sku": "kibble", "quantity": 1}]})
        async for event in c.subscribe("orders", since=0):
            print(event["seq"], event["type"])
        async for item in c.subscribe("orders", snapshot=True):  # the rows as of N, then the events
            if item["type"] == "snapshot":
                rows = item["rows"]

It reconnects on its own with exponential backoff and jitter (`backoff_delay`: the n-th wait in
a row is drawn between half and all of min(30 s, 1 s x 2^(n-1)), so 0.5-1 s, 1-2 s, 2-4 s, ...
15-30 s; it starts over after a connection that stayed up 10 s), resubscribes every channel after the last seq it
delivered (with the log's id and an anchor, the newest event it delivered with its hash, so
that another log, or this one after a restore or a failover that lost events it delivered, is
refused instead of replayed), and resends unacknowledged commands with the same command id,
so the server applies each at most once. A caller never sees a gap, a duplicate event or a
double-applied command across a reconnect, nor a mix of two histories: when the server's log
is not the one the caller folded, the subscription ends with ResyncRequired, and the caller
starts over (subscribe again from since 0).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from ..domain import ErrorCode

log = logging.getLogger("orderlog.client")

BACKOFF_START = 1.0
BACKOFF_CAP = 30.0
STABLE_AFTER = 10.0  # seconds connected before the backoff starts over
SUB_ID = "sub-"  # subscribe requests carry id "sub-N" so that a refusal finds its subscription
EVENT_BUFFER = 1000  # events buffered per subscription before the reader waits for the caller


def backoff_delay(attempt: int, start: float = BACKOFF_START, cap: float = BACKOFF_CAP,
                  rng: random.Random | None = None) -> float:
    """The wait after `attempt` + 1 failed connects in a row: drawn uniformly between half and
    all of min(cap, start * 2**attempt) (the jitter spreads reconnects after a server restart)."""
    ceiling = min(cap, start * 2 ** attempt)
    return (rng or random).uniform(ceiling / 2, ceiling)


class OrderlogError(Exception):
    """An `error` reply: `code` is its error code (`domain.ErrorCode`, docs/protocol.md section 2)."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class ResyncRequired(OrderlogError):
    """A subscription's history is not this server's log (another log, a restored backup, a
    failover): drop what was folded from it and subscribe again from since 0."""


class AuthenticationFailed(OrderlogError):
    """The server closed with 4001; reconnecting with the same token cannot help."""


class _Pending:
    def __init__(self, frame: dict):
        self.frame = frame
        self.done = trio.Event()
        self.reply: dict | None = None


def _error(message: dict) -> OrderlogError:
    """The exception for an `error` reply."""
    kind = ResyncRequired if message.get("code") == ErrorCode.RESYNC_REQUIRED else OrderlogError
    return kind(message.get("code", ErrorCode.INTERNAL), message.get("message", ""), message.get("details"))


class _Subscription:
    def __init__(self, channel: str, since: int | None, request_id: str, snapshot: bool = False,
                 anchor: dict | None = None, log_id: str | None = None):
        self.channel = channel
        self.snapshot = snapshot and since is None  # start from the rows as of a seq (v1.2)
        self.snapshot_seq: int | None = None  # the seq of the snapshot being received
        self.snapshot_hash: str | None = None  # the hash of event snapshot_seq, if this user's feeds carry it
        self.request_id = request_id
        self.last: int | None = since  # the last seq delivered to the caller (None: live only, until `subscribed`)
        self.anchor = anchor  # {seq, hash}: the newest event delivered with its hash
        self.log_id = log_id  # the log that the delivered history comes from (a welcome's log_id)
        self.resubscribing = False  # a resubscribe after a hole is on its way: wait for its `subscribed`
        self.resumed = False  # the next `subscribed` answers the resubscribe after a reconnect
        self.send, self.receive = trio.open_memory_channel[dict](EVENT_BUFFER)
        self.error: OrderlogError | None = None


class Client:
    def __init__(self, url: str, token: str | Callable[[], str], *, backoff_start: float = BACKOFF_START,
                 backoff_cap: float = BACKOFF_CAP, on_status: Callable[[str], None] | None = None):
        self.url = url
        self._token = token
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.on_status = on_status or (lambda text: log.info("%s", text))
        self.welcome: dict | None = None
        self.log_id: str | None = None
        self._ws = None
        self._connected = trio.Event()
        self._pending: dict[str, _Pending] = {}
        self._subs: dict[str, _Subscription] = {}
        self._ids = itertools.count(1)
        self.fatal: BaseException | None = None

    # public API ---------------------------------------------------------------------------

    async def command(self, name: str, order_id: str | None = None, data: dict | None = None,
                      expected_version: int | None = None, command_id: str | None = None) -> dict:
        """Send a command; return its `ack` (a dict) or raise OrderlogError with the code."""
        frame: dict[str, Any] = {"type": "command", "id": command_id or uuid.uuid4().hex, "name": name}
        if order_id is not None:
            frame["order_id"] = order_id
        if data is not None:
            frame["data"] = data
        if expected_version is not None:
            frame["expected_version"] = expected_version
        return await self.request(frame)

    async def get_order(self, order_id: str) -> dict:
        return (await self.request({"type": "get", "order_id": order_id}))["order"]

    async def get_stock(self, sku: str) -> dict:
        return (await self.request({"type": "get", "sku": sku}))["stock"]

    async def query(self, filter: dict | None = None, limit: int = 100) -> dict:
        return await self.request({"type": "query", "filter": filter or {}, "limit": limit})

    async def request(self, frame: dict) -> dict:
        """Send any request and wait for its reply; resent after a reconnect until answered."""
        frame = dict(frame)
        frame.setdefault("id", f"r{next(self._ids)}")
        pending = _Pending(frame)
        self._pending[frame["id"]] = pending
        try:
            await self._send_if_connected(frame)
            await pending.done.wait()
        finally:
            self._pending.pop(frame["id"], None)
        reply = pending.reply or {}
        if reply.get("type") == "error":
            raise _error(reply)
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
        if channel in self._subs:
            raise ValueError(f"already subscribed to {channel}")
        if snapshot and since is not None:
            raise ValueError("snapshot and since exclude each other")
        sub = _Subscription(channel, since, f"{SUB_ID}{next(self._ids)}", snapshot, anchor, log_id)
        self._subs[channel] = sub
        try:
            await self._send_if_connected(self._subscribe_frame(sub))
            async with sub.receive:
                async for event in sub.receive:
                    yield event
            if sub.error is not None:
                raise sub.error
        finally:
            self._subs.pop(channel, None)
            if self._ws is not None:
                with trio.move_on_after(1):
                    try:
                        await self._ws.send_message(json.dumps({"type": "unsubscribe", "channel": channel}))
                    except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

    # the connection loop ------------------------------------------------------------------

    def _subscribe_frame(self, sub: _Subscription) -> dict:
        frame: dict[str, Any] = {"type": "subscribe", "id": sub.request_id, "channel": sub.channel}
        if sub.last is not None:
            frame["since"] = sub.last
            if sub.log_id is not None:
                frame["log_id"] = sub.log_id
            if sub.anchor is not None:
                frame["anchor"] = sub.anchor
        elif sub.snapshot:
            frame["snapshot"] = True
            sub.snapshot_seq = None
        return frame

    async def _send_if_connected(self, frame: dict) -> None:
        ws = self._ws
        if ws is None:
            return  # sent on (re)connect
        try:
            await ws.send_message(json.dumps(frame))
        except ConnectionClosed:
            pass  # the connection loop resends it

    def _token_now(self) -> str:
        return self._token() if callable(self._token) else self._token

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up until cancelled (or the token is refused)."""
        attempt = 0
        started = False
        while True:
            connected_at = None
            try:
                async with open_websocket_url(self.url, extra_headers=[(b"authorization", f"Bearer {self._token_now()}".encode())]) as ws:
                    welcome = json.loads(await ws.get_message())
                    if welcome.get("type") != "welcome":
                        raise OrderlogError(ErrorCode.INTERNAL, f"expected welcome, got {welcome.get('type')!r}")
                    if self.log_id is not None and welcome.get("log_id") != self.log_id:
                        self.on_status(f"the server's log changed (log_id {welcome.get('log_id')}); resubscribing "
                                       "will be refused with resync_required")
                    self.welcome = welcome
                    self.log_id = welcome.get("log_id")
                    self._ws = ws
                    connected_at = trio.current_time()
                    self.on_status(f"connected to {self.url} (head {welcome.get('head')})")
                    for sub in list(self._subs.values()):
                        sub.resubscribing = False
                        sub.resumed = started and sub.last is not None
                        await ws.send_message(json.dumps(self._subscribe_frame(sub)))
                    for pending in list(self._pending.values()):
                        await ws.send_message(json.dumps(pending.frame))
                    if not started:
                        started = True
                        task_status.started(self)
                    await self._read(ws)
            except ConnectionClosed as exc:
                reason = exc.reason
                if reason is not None and reason.code == 4001:
                    self.fatal = AuthenticationFailed("unauthorized", reason.reason or "authentication failed")
                    self._fail_all(self.fatal)
                    raise self.fatal from None
                self.on_status(f"disconnected ({reason.code if reason else 'no close frame'})")
            except (OSError, HandshakeError, ConnectionRejected, trio.BrokenResourceError) as exc:
                self.on_status(f"cannot connect: {why(exc)}")
            finally:
                self._ws = None
            if connected_at is not None and trio.current_time() - connected_at >= STABLE_AFTER:
                attempt = 0
            delay = backoff_delay(attempt, self.backoff_start, self.backoff_cap)
            attempt = min(attempt + 1, 30)
            self.on_status(f"reconnecting in {delay:.1f} s")
            await trio.sleep(delay)

    def _fail_all(self, error: OrderlogError) -> None:
        for pending in list(self._pending.values()):
            pending.reply = {"type": "error", "code": error.code, "message": error.message}
            pending.done.set()
        for sub in self._subs.values():
            sub.error = error
            sub.send.close()

    async def _read(self, ws) -> None:
        while True:
            message = json.loads(await ws.get_message())
            kind = message.get("type")
            channel = message.get("channel")
            if "seq" in message and "prev" in message and channel is not None:
                await self._deliver(ws, message)
                continue
            if kind == "snapshot":
                await self._snapshot_frame(message)
                continue
            request_id = message.get("id")
            if isinstance(request_id, str) and request_id.startswith(SUB_ID):
                sub = next((s for s in self._subs.values() if s.request_id == request_id), None)
                if kind == "subscribed" and sub is not None:
                    sub.resubscribing = False
                    sub.log_id = self.log_id  # what follows comes from this connection's log
                    if message.get("snapshot") is True:
                        sub.snapshot_seq = message.get("since")  # rows first; `last` once they are all here
                        sub.snapshot_hash = message.get("hash")
                    elif sub.last is None:
                        # Live only: the feed starts after `since` (the head), so a reconnect
                        # before the first event must resume from there, not from a new head.
                        sub.last = message.get("since")
                    if sub.resumed:
                        sub.resumed = False
                        self.on_status(f"resumed {sub.channel} from seq {message.get('since')}")
                if kind == "error" and sub is not None:
                    # A (re)subscribe refused, e.g. resync_required: the caller must start over.
                    sub.error = _error(message)
                    if isinstance(sub.error, ResyncRequired):
                        self.on_status(f"resync required on {sub.channel}: {sub.error.message}")
                    sub.send.close()
                continue
            pending = self._pending.get(request_id) if request_id is not None else None
            if pending is not None:
                pending.reply = message
                pending.done.set()
            elif kind == "error":
                log.warning("server error: %s %s", message.get("code"), message.get("message"))

    async def _snapshot_frame(self, frame: dict) -> None:
        sub = self._subs.get(frame["channel"])
        if sub is None or sub.last is not None or sub.snapshot_seq != frame.get("seq"):
            return
        if frame.get("last"):
            sub.last = frame["seq"]  # complete: from now on, resume after it, anchored on it
            if isinstance(sub.snapshot_hash, str):
                sub.anchor = {"seq": frame["seq"], "hash": sub.snapshot_hash}
        try:
            await sub.send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._subs.pop(sub.channel, None)

    async def _deliver(self, ws, event: dict) -> None:
        sub = self._subs.get(event["channel"])
        if sub is None or sub.last is None:
            return
        seq, prev = event["seq"], event["prev"]
        if sub.last is not None and seq <= sub.last:
            return  # already delivered before a reconnect
        if sub.last is not None and prev != sub.last:
            # A hole that may hide an event meant for us: resume from what we hold (once: the
            # events still in flight from the replaced subscription would ask again).
            if not sub.resubscribing:
                sub.resubscribing = True
                await ws.send_message(json.dumps(self._subscribe_frame(sub)))
            return
        sub.last = seq
        if isinstance(event.get("hash"), str) and not event.get("redacted"):
            sub.anchor = {"seq": seq, "hash": event["hash"]}
        try:
            await sub.send.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._subs.pop(sub.channel, None)


@asynccontextmanager
async def connect(url: str, token: str | Callable[[], str], **options: Any) -> AsyncIterator[Client]:
    """A connected Client for the duration of the block (it reconnects on its own).

    A refused token raises AuthenticationFailed itself, not inside an exception group.
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
        raise _single(group)


def why(exc: BaseException) -> str:
    """A failed connect's reason, never empty: trio-websocket raises an empty HandshakeError whose
    cause (an OSError, itself caused by a group of one error per address) says what happened."""
    messages: list[str] = []
    strerror = None
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, BaseExceptionGroup) and error.exceptions:
            error = error.exceptions[0]
            continue
        if str(error):
            messages.append(str(error))
        if isinstance(error, OSError) and error.strerror and strerror is None:
            strerror = error.strerror.rsplit(": ", 1)[-1]  # trio's: "Error connecting to (...): Connection refused"
        error = error.__cause__ or error.__context__
    text = messages[0] if messages else type(exc).__name__
    if strerror and strerror not in text:
        text = f"{text} ({strerror})"
    return text


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside (nested) one-member groups, else the group itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def tail(url: str, token: str, channel: str, since: int | None, emit: Callable[[str], None],
               note: Callable[[str], None], count: int | None = None, snapshot: bool = False) -> int:
    """`orderlog tail`: print the channel's events as JSON lines; 0 when done, 1 on a refusal.

    With `snapshot`, the rows as of a seq come first, one `{"order": ROW}` or `{"stock": ROW}`
    line each (the lines of `orderlog state`), then the events after that seq (`count` counts
    events only)."""
    printed = 0
    kind = "stock" if channel == "inventory" else "order"
    try:
        async with connect(url, token, on_status=note) as client:
            async for event in client.subscribe(channel, since, snapshot=snapshot):
                if event["type"] == "snapshot":
                    if "total" in event:
                        note(f"snapshot of {channel} as of seq {event['seq']}: {event['total']} rows")
                    for row in event["rows"]:
                        emit(json.dumps({kind: row}, ensure_ascii=False, separators=(",", ":")))
                    continue
                emit(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
                printed += 1
                if count is not None and printed >= count:
                    return 0
    except ResyncRequired as exc:
        note(f"error: {exc}: the server's log is not the one the lines above came from (another log, "
             "a restored backup or a failover); run again with --since 0")
        return 1
    except OrderlogError as exc:
        note(f"error: {exc}")
        return 1
    return 0
