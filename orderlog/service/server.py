"""The trio shell: WebSocket server, the writer task, subscriptions and shutdown.

Theory of operation.
- One writer task owns the writing SQLite connection. Connections hand it commands through a
  bounded channel; it takes whatever is waiting (in arrival order), commits it as one batch in a
  worker thread (group commit), publishes the new events to the in-memory window, and only
  then sends the acks. Pipelined: the next batch starts committing as soon as one has committed,
  and the one committed is published and acked while the next commits.
- Each connection runs one nursery: its receive loop (requests) and, only while one of its
  subscriptions is catching up, a send loop (catch-up pages and `live` markers). Keep-alive pings
  and token expiry of all connections are checked by one sweep task. Every byte for a connection
  goes through its SocketWriter (sockets.py), which writes without waiting when the kernel takes
  the bytes, so frames go out in the order they were produced.
- Subscriptions are cursors on the log. A subscription that is behind is moved forward by its
  connection's send loop, from the in-memory window or from SQLite, one page at a time, waiting
  for the socket to drain in between. Once caught up it is attached to the Hub, and each commit's
  events are routed to it and written straight from the writer task: no task wakes per event.
  A slow client only delays itself, and its memory is bounded by HIGH_WATER plus one page.
- Replies are written at once. When a connection's socket queue is over HIGH_WATER, or too many
  of its commands await their acks, its receive loop stops reading, so a client that sends but
  never reads is held back by TCP, not by our memory.
"""

from __future__ import annotations

import itertools
import logging
import re
import signal
import ssl
import time
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream

from .. import auth, protocol
from ..auth import AUTH_CLOSE_CODE, AuthError
from ..canonical import event_json, format_time
from ..domain import Principal, Rejected, authorize, can_see_order, validate
from ..feed import Channel, FeedEvent, Window, channel_frames, feed_event
from ..records import Ack, Request
from ..store import Store, Unavailable
from ..wire import text_frame
from . import gcpolicy, http
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, channel_kind
from .settings import Settings
from .sockets import HIGH_WATER, SocketWriter, WriterStream

log = logging.getLogger("orderlog")

WS_PATH = "/v1/ws"
GOING_AWAY = 1001
MAX_BATCH = 2000  # commands per group commit
WRITER_QUEUE = 10_000  # commands waiting for the writer before senders block
CATCHUP_PAGE = 500  # events read from SQLite per catch-up step
WINDOW_PAGE = 500  # events taken from the window per send-loop step
MAX_INFLIGHT = 256  # commands of one connection waiting for their ack
READERS = 2  # read-only SQLite connections for catch-up, get and query
EXTERNAL_POLL = 1.0  # seconds between looks for events written by another process
CLOSE_TIMEOUT = 2.0
SWEEP_PERIOD = 0.25  # seconds between checks of pings and token expiry
PING_FRAME = b"\x89\x04ping"  # an unmasked ping frame with a 4-byte payload
RECEIVE_BUFFER = 64 * 1024  # bytes per socket read
PUBLISH_LIMIT = 100_000  # events read back per commit; the rest on the writer's next turn  # seconds to wait for a client's close handshake


class CloseConnection(Exception):
    """Raised inside a connection's tasks to close it with a code and reason."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


# -- storage access from trio -----------------------------------------------------------------


class Readers:
    """A few read-only connections, each used by one worker thread at a time."""

    def __init__(self, path: str, count: int = READERS):
        self._free = [Store.open(path, readonly=True) for _ in range(count)]
        self._all = list(self._free)
        self._limiter = trio.CapacityLimiter(count)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._limiter:
            store = self._free.pop()
            try:
                return await trio.to_thread.run_sync(fn, store, *args)
            finally:
                self._free.append(store)

    def close(self) -> None:
        for store in self._all:
            store.close()


@attrs.define
class Pending:
    request: Request
    connection: "Connection"


class Hub:
    """The committed head, the window of recent events, and the subscriptions fed directly.

    A subscription that has caught up (its `live` marker sent, nothing of the window left to
    send) is *attached*: `publish` routes each new event to the attached subscriptions that may
    see it (indexed by channel and customer, so a customer's feed costs nothing for others'
    events) and writes each connection's frames with one non-blocking write, without waking any
    task. A connection whose socket does not keep up (more than HIGH_WATER bytes queued) has its
    subscriptions detached at the exact event reached; its own send loop then continues from
    there, from the window or from SQLite.
    """

    def __init__(self, head: int, size: int):
        self.window = Window(head, size)
        self.staff_orders: set[Subscription] = set()
        self.customer_orders: dict[str, set[Subscription]] = {}
        self.inventory: set[Subscription] = set()
        self.streams: dict[str, set[Subscription]] = {}

    @property
    def head(self) -> int:
        return self.window.head

    def _index(self, sub: "Subscription") -> set:
        name = sub.channel.name
        if name == "orders":
            if sub.channel.principal.role == "customer":
                return self.customer_orders.setdefault(sub.channel.principal.user, set())
            return self.staff_orders
        if name == "inventory":
            return self.inventory
        return self.streams.setdefault(name, set())

    def attach(self, sub: "Subscription") -> None:
        """Feed `sub` directly from now on; it has been sent everything up to the head."""
        sub.attached = True
        self._index(sub).add(sub)

    def detach(self, sub: "Subscription", cursor: int | None = None) -> None:
        """Stop feeding `sub` directly; it has been sent everything visible up to `cursor`."""
        if not sub.attached:
            return
        sub.attached = False
        sub.cursor = self.head if cursor is None else cursor
        index = self._index(sub)
        index.discard(sub)
        if not index:
            name = sub.channel.name
            if name == "orders" and sub.channel.principal.role == "customer":
                self.customer_orders.pop(sub.channel.principal.user, None)
            elif name.startswith("order:"):
                self.streams.pop(name, None)

    def publish(self, events: list[FeedEvent]) -> None:
        if not events:
            return
        self.window.append(events)
        out: dict[Connection, list[bytes]] = {}
        sizes: dict[Connection, int] = {}
        staff, inventory, streams, customers = self.staff_orders, self.inventory, self.streams, self.customer_orders
        for event in events:
            if event.is_order:
                targets = list(staff)
                if event.owner in customers:
                    targets.extend(customers[event.owner])
                if event.stream in streams:
                    targets.extend(streams[event.stream])
            elif inventory:
                targets = list(inventory)
            else:
                continue
            for sub in targets:
                if not sub.attached:
                    continue  # detached earlier in this publish
                connection = sub.connection
                frame = event.frame(sub.channel_json, sub.prev, sub.redact and sub.channel.redacts(event))
                sub.prev = event.seq
                parts = out.get(connection)
                if parts is None:
                    parts = out[connection] = []
                    sizes[connection] = connection.writer.buffered
                parts.append(frame)
                sizes[connection] += len(frame)
                if sizes[connection] > HIGH_WATER:
                    # Too much for this socket now: its own send loop takes over from here.
                    for other in list(connection.subs.values()):
                        if other.attached:
                            self.detach(other, event.seq if other.prev == event.seq else event.seq - 1)
                    connection.wake()
        for connection, parts in out.items():
            connection.write_frames(parts)


# -- the service -------------------------------------------------------------------------------


class _InThread:
    """`fn(*args)`, started at once in a worker thread; `await wait()` for its result.

    Like trio.to_thread.run_sync (the result cannot be abandoned: `wait` is not cancellable),
    but the thread starts before the caller's next checkpoint, and the caller may do other work
    meanwhile. to_thread first passes a checkpoint (its capacity limiter), which lets every task
    made runnable meanwhile run before the thread is even asked to start, a few ms per group
    commit under load. Only the writer uses this, one thread at a time, so it needs no limiter.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self._result: Any = None  # an outcome.Outcome once the thread is done
        self._task: Any = None  # the task waiting for it
        token = trio.lowlevel.current_trio_token()

        def deliver(result: Any) -> None:  # in the worker thread
            token.run_sync_soon(self._arrived, result)

        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver, name="orderlog writer")

    def _arrived(self, result: Any) -> None:
        if self._task is not None:
            trio.lowlevel.reschedule(self._task, result)
        else:
            self._result = result

    async def wait(self) -> Any:
        if self._result is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self._result.unwrap()
        self._task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


@attrs.frozen
class _Committed:
    """A batch whose commit has ended: one outcome per command, and the events to publish."""

    batch: list[Pending]
    outcomes: list
    events: list[FeedEvent]


class Clock:
    """Now as store.format_time writes it (RFC 3339 UTC, milliseconds), for each command's `at`:
    the date and time of day are formatted once per second, not once per command."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        moment = time.time()
        second = int(moment)
        if second != self._second:
            self._prefix = format_time(datetime.fromtimestamp(second, timezone.utc))[:-4]  # "...:SS."
            self._second = second
        return f"{self._prefix}{int((moment - second) * 1000):03d}Z"


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store.open(settings.db, create=True, synchronous=settings.synchronous)
        self.log_id = self.store.log_id
        self.readers = Readers(settings.db)
        self.hub = Hub(self.store.head(), settings.window)
        self.connections: set[Connection] = set()
        self._ids = itertools.count(1)
        self._send_commands, self._receive_commands = trio.open_memory_channel[Pending](WRITER_QUEUE)
        self.writer_alive = False
        self.stopping = False
        self._behind = False  # the last publish stopped at PUBLISH_LIMIT: read on at once
        self._read_head = self.hub.head  # the last event a commit returned (published or about to be)
        self.write_error: str | None = None  # why the last commit failed, until one succeeds
        self.metrics = Metrics(head=lambda: self.hub.head, lag=self.max_lag)
        self.clock = Clock()
        self.routes = {"/healthz": self._healthz, "/metrics": self._metrics}

    def max_lag(self) -> int:
        head = self.hub.head
        # An attached subscription is fed from each commit: its cursor is the head, not `sub.cursor`.
        return max((0 if sub.attached else head - sub.cursor for c in self.connections for sub in c.subs.values()),
                   default=0)

    def health(self) -> tuple[bool, dict]:
        ok = self.writer_alive and not self.stopping and self.write_error is None
        body = {"status": "ok" if ok else "unavailable", "head": self.hub.head, "log_id": self.log_id,
                "writer": "alive" if self.writer_alive else "stopped", "writable": self.write_error is None,
                "connections": len(self.connections)}
        if self.write_error is not None:
            body["error"] = self.write_error
        return ok, body

    async def _healthz(self, head: http.Head) -> bytes:
        ok, body = self.health()
        return http.response(200 if ok else 503, (protocol.encode(body) + "\n").encode(), "application/json")

    async def _metrics(self, head: http.Head) -> bytes:
        return http.response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    # writer ---------------------------------------------------------------------------

    async def submit(self, pending: Pending) -> None:
        await self._send_commands.send(pending)

    def submit_nowait(self, pending: Pending) -> bool:
        """Hand a command to the writer without a trip through the scheduler; False if its queue
        is full (then `submit` waits)."""
        try:
            self._send_commands.send_nowait(pending)
        except trio.WouldBlock:
            return False
        return True

    def _commit(self, requests: list[Request], after: int) -> tuple[list, list[FeedEvent]]:
        outcomes: list = []
        self.store.last_appended = []
        try:
            outcomes = self.store.execute_batch(requests) if requests else []
        finally:
            rows = self.store.last_appended
            if rows and rows[0][0] == after + 1 and len(rows) <= PUBLISH_LIMIT:
                events = [feed_event(row) for row in rows]  # ours, straight after the head
            else:
                # Read back what is committed: events of another process, or after a failure.
                events = self.store.read_feed(None, after, 2**62, PUBLISH_LIMIT)
        return outcomes, events

    async def sweep(self) -> None:
        """Every connection's keep-alive ping and token expiry, in one task for all of them."""
        interval = self.settings.ping_interval
        period = min(SWEEP_PERIOD, interval / 4)
        while True:
            await trio.sleep(period)
            now, wall = trio.current_time(), time.time()
            for connection in list(self.connections):
                connection.tick(now, wall, interval)

    async def writer(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Take waiting commands and commit them as one batch; then publish and ack them.

        Pipelined: as soon as a batch is committed, the next one (the commands that arrived
        meanwhile) starts committing in the worker thread, and the first is published and acked
        while it runs. Commits stay one at a time and in order; publishes and acks too, each
        after its own commit.
        """
        self.writer_alive = True
        task_status.started()
        committed: _Committed | None = None  # committed, not yet published and acked
        try:
            while True:
                batch: list[Pending] = []
                closed = False
                if committed is None:  # nothing to do meanwhile: wait for a command (or poll)
                    with trio.move_on_after(0 if self._behind else EXTERNAL_POLL):
                        try:
                            batch.append(await self._receive_commands.receive())
                        except trio.EndOfChannel:
                            return
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive_commands.receive_nowait())
                    except trio.WouldBlock:
                        break
                    except trio.EndOfChannel:
                        closed = True
                        break
                commit = None
                if batch or committed is None:  # an empty batch reads what another process wrote
                    commit = _InThread(self._commit, [p.request for p in batch], self._read_head)
                    started = time.perf_counter()
                if committed is not None:
                    self._finish(committed)  # while `commit` runs
                    committed = None
                if commit is not None:
                    committed = await self._committed(batch, commit, started)
                    if not batch and self.write_error is not None:
                        self._finish(committed)
                        committed = None
                        await self._probe_writable()
                if closed:
                    return
        finally:
            if committed is not None:
                self._finish(committed)
            self.writer_alive = False

    async def _probe_writable(self) -> None:
        """While commits fail, try an empty one on each idle turn, so that /healthz recovers when
        the fault clears even if no command arrives (a load balancer that took us out on 503
        sends none)."""
        try:
            await trio.to_thread.run_sync(self.store.probe_writable)
        except Unavailable as exc:
            self.write_error = str(exc)
        else:
            log.info("event=commit.recovered")
            self.write_error = None

    async def _committed(self, batch: list[Pending], commit: _InThread, started: float) -> "_Committed":
        """The outcome of `commit` (running `batch`): acks and events, or the same rejection for all."""
        try:
            outcomes, events = await commit.wait()
            if batch:
                self.write_error = None
        except Unavailable as exc:
            log.error("event=commit.failed commands=%d reason=%r", len(batch), str(exc))
            self.write_error = str(exc)
            outcomes = [Rejected("unavailable", f"the log cannot be written right now ({exc}); retry later")] * len(batch)
            events = []
        except Exception:
            log.exception("event=commit.crashed commands=%d", len(batch))
            outcomes = [Rejected("internal", "internal error; the command was not applied")] * len(batch)
            events = []
        if batch:
            self.metrics.batch_size.observe(len(batch))
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
        if events:
            self._read_head = events[-1].seq
        self._behind = len(events) >= PUBLISH_LIMIT
        return _Committed(batch, outcomes, events)

    def _finish(self, committed: "_Committed") -> None:
        """Publish a committed batch's events, then ack its commands."""
        self.hub.publish(committed.events)
        appended = 0
        for pending, outcome in zip(committed.batch, committed.outcomes):
            if isinstance(outcome, Ack) and not outcome.duplicate:
                appended += len(outcome.events)
            self.metrics.command(pending.request.command.name, _outcome_label(outcome))
            pending.connection.command_done(pending.request.command.command_id, outcome)
        self.metrics.events.inc(appended)

    # connections ----------------------------------------------------------------------

    async def handle_tcp(self, stream: trio.SocketStream) -> None:
        """One TCP connection: read the request head, then WebSocket or plain HTTP."""
        settings = self.settings
        head = None  # stays None when the handshake timeout cuts the read short (slowloris)
        try:
            with trio.move_on_after(settings.handshake_timeout):
                try:
                    head = await http.read_head(stream)
                    if head is not None and _head_size(head.raw) > http.MAX_HEAD_BYTES:
                        raise http.BadHead(431, "request head too large")
                except http.BadHead as exc:
                    await stream.send_all(http.response(exc.status, f"{exc}\n".encode()))
                    head = None
                if head is not None and not head.is_websocket:
                    await stream.send_all(await http.answer_http(head, self.routes, WS_PATH))
                    head = None
            if head is None:
                return
            async with trio.open_nursery() as nursery:
                writer = SocketWriter(stream, nursery)
                ws_stream = WriterStream(stream, writer, head.raw, settings.max_message_size)
                with trio.move_on_after(settings.handshake_timeout) as scope:
                    request = await wrap_server_stream(nursery, ws_stream, max_message_size=settings.max_message_size,
                                                       receive_buffer_size=RECEIVE_BUFFER)
                if not scope.cancelled_caught:
                    await self.handle(request, ws_stream, _remote_name(stream))
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        except Exception:
            # A bug met by one connection ends that connection, never the server (this handler
            # runs in the listeners' nursery, so anything escaping here would stop everything).
            log.exception("event=connection.crashed")
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def handle(self, request: WebSocketRequest, stream: WriterStream, remote: str) -> None:
        """A WebSocket handshake: check path, origin and capacity, then run the connection."""
        target = urlsplit(request.path)
        if target.path != WS_PATH:
            await request.reject(404, body=b"not found: the WebSocket endpoint is /v1/ws\n")
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        origin = headers.get("origin")
        if self.settings.allow_origins and origin is not None and origin not in self.settings.allow_origins:
            log.info("event=handshake.rejected status=403 reason=origin origin=%r", origin[:200])
            await request.reject(403, body=b"origin not allowed\n")
            return
        if self.stopping or len(self.connections) >= self.settings.max_connections:
            await request.reject(503, body=b"server busy: too many connections\n")
            return
        token = _handshake_token(target.query, headers.get("authorization"))
        ws = await request.accept()
        stream.accepted.set()
        connection = Connection(self, ws, stream, next(self._ids), token, remote)
        self.connections.add(connection)
        self.metrics.connections.inc()
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            self.metrics.connections.dec()
            gcpolicy.connection_closed()
            for channel in list(connection.subs):
                connection.drop_subscription(channel)
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await ws.aclose()

    async def close_all(self, code: int, reason: str) -> None:
        async with trio.open_nursery() as nursery:
            for connection in list(self.connections):
                nursery.start_soon(connection.close, code, reason)

    def close(self) -> None:
        self.readers.close()
        try:
            self.store.checkpoint()
        finally:
            self.store.close()


def _remote_name(stream: trio.abc.Stream) -> str:
    """`address:port` of the peer, for the logs."""
    try:
        sock = stream.socket if isinstance(stream, trio.SocketStream) else stream.transport_stream.socket
        host, port = sock.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except (AttributeError, OSError, ValueError, TypeError):
        return "-"


def _outcome_label(outcome: Ack | Rejected) -> str:
    if isinstance(outcome, Ack):
        return "duplicate" if outcome.duplicate else "ack"
    return outcome.code


def _head_size(raw: bytes) -> int:
    """Bytes of the request head at the start of `raw`. h11 enforces its size limit only on a
    head still incomplete, so a larger one that arrives in a single read gets through it."""
    end = re.search(rb"\r?\n\r?\n", raw)
    return len(raw) if end is None else end.end()


def _handshake_token(query: str, authorization: str | None) -> str | None:
    """The token from `?token=` (first) or `Authorization: Bearer` (second), if any."""
    values = parse_qs(query, keep_blank_values=True).get("token")
    if values:
        return values[0]
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
    return None


# -- one connection ----------------------------------------------------------------------------


@attrs.define(eq=False, slots=True)
class Subscription:
    connection: "Connection"
    channel: Channel
    cursor: int  # every visible event with seq <= cursor has been sent (while detached)
    prev: int  # seq of the last event sent (or `since`)
    head: int  # subscribed.head: `live` comes once cursor >= it
    live_sent: bool = False
    attached: bool = False  # fed by Hub.publish; its cursor is then the hub's head
    channel_json: bytes = b""
    redact: bool = False  # a customer: other customers' order ids are left out of inventory

    def __attrs_post_init__(self) -> None:
        self.channel_json = self.channel.json_name
        self.redact = self.channel.principal.role == "customer"


class Connection:
    def __init__(self, service: Service, ws: WebSocketConnection, stream: WriterStream, number: int,
                 token: str | None, remote: str):
        self.service = service
        self.ws = ws
        self.stream = stream
        self.writer = stream.writer
        self.number = number
        self.handshake_token = token
        self.principal: Principal | None = None
        self.expires_at = 0.0
        self.subs: dict[str, Subscription] = {}
        self.inflight = 0
        self._space = trio.Event()
        self._sending = False  # the send loop runs (only while some subscription is catching up)
        self.ping_sent_at: float | None = None  # trio time of the unanswered keep-alive ping
        self._nursery: trio.Nursery | None = None
        self.close_reason: tuple[int, str] | None = None
        settings = service.settings
        self._tokens = float(settings.rate_burst)
        self._refilled = time.monotonic()
        self.remote = remote
        self._ended = False  # run() has returned: messages still read are dropped
        self._closing = False  # handle_fast asked for a close: messages still read are dropped
        stream.receiver = self  # simple text messages come to handle_fast (wsfast.WriterStream)

    # lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        log.info("event=connection.open conn=%d remote=%s", self.number, self.remote)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._guard(self._authenticate, stop_after=False)
                if self.principal is not None and self.close_reason is None:
                    nursery.start_soon(self._guard, self._receive_loop)
        finally:
            self._ended = True
            if self.close_reason is not None:
                code, reason = self.close_reason
            elif self.ws.closed is not None:
                code, reason = self.ws.closed.code, self.ws.closed.reason or ""
            else:
                code, reason = 1006, ""
            user = self.principal.user if self.principal else "-"
            role = self.principal.role if self.principal else "-"
            log.info("event=connection.close conn=%d remote=%s user=%s role=%s code=%s reason=%r",
                     self.number, self.remote, user, role, code, reason)

    async def _guard(self, task: Callable[[], Any], stop_after: bool = True) -> None:
        """Run one of the connection's tasks; any way it ends closes the whole connection."""
        try:
            await task()
        except CloseConnection as exc:
            await self.close(exc.code, exc.reason)
            return
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._lost(exc)
            stop_after = True
        if stop_after:
            self._stop()

    def _lost(self, exc: BaseException) -> None:
        """Note why the connection ended: the peer's close, or (the socket died under a direct
        write, the peer reset it) a close without a handshake."""
        if isinstance(exc, ConnectionClosed):
            reason = (self.ws.closed.code, self.ws.closed.reason or "") if self.ws.closed else (1006, "")
        else:
            reason = (1006, "connection lost")
        self.close_reason = self.close_reason or reason

    async def close(self, code: int, reason: str) -> None:
        """Close with `code` and `reason` (once), then stop every task of this connection."""
        if self.close_reason is None and self.ws.closed is None:
            self.close_reason = (code, reason)
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await self.ws.aclose(code, reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # authentication -------------------------------------------------------------------

    async def _authenticate(self) -> None:
        token = self.handshake_token
        request_id = None
        if token is None:
            with trio.move_on_after(self.service.settings.auth_timeout):
                first = await self.ws.get_message()
                self.stream.slow_messages -= 1
                try:
                    message = protocol.parse_json_object(first)
                except protocol.ClientError:
                    message = None
                if not message or message.get("type") != "auth":
                    raise CloseConnection(AUTH_CLOSE_CODE, auth.REQUIRED)
                token = message.get("token")
                request_id = message.get("id") if isinstance(message.get("id"), str) else None
                if token is None:
                    raise CloseConnection(AUTH_CLOSE_CODE, auth.INVALID)
            if token is None:
                raise CloseConnection(AUTH_CLOSE_CODE, auth.TIMEOUT)
        self._accept_token(token, request_id)

    def _accept_token(self, token: Any, request_id: str | None) -> None:
        keys = self.service.settings.keys
        assert keys is not None
        try:
            claims = auth.verify(token, keys, time.time())
        except AuthError as exc:
            log.info("event=auth.refused conn=%d remote=%s reason=%r detail=%r",
                     self.number, self.remote, exc.reason, exc.detail)
            raise CloseConnection(AUTH_CLOSE_CODE, exc.reason) from None
        if self.principal is not None and claims.principal.user != self.principal.user:
            raise CloseConnection(AUTH_CLOSE_CODE, auth.SUBJECT_CHANGED)
        first = self.principal is None
        self.principal = claims.principal
        self.expires_at = claims.expires_at
        if first:
            log.info("event=connection.auth conn=%d user=%s role=%s", self.number, claims.principal.user,
                     claims.principal.role)
        self.push(protocol.reply(
            "welcome", request_id, user=claims.principal.user, role=claims.principal.role,
            head=self.service.hub.head, log_id=self.service.log_id, expires_at=auth.rfc3339(claims.expires_at),
        ))

    async def _retarget_subscriptions(self) -> None:
        """After a refresh changed the role: every open subscription now sees what the new role
        may see, from where it was; an `order:` channel the new role may not read is closed with
        an unsolicited `unsubscribed`."""
        principal = self.principal
        assert principal is not None
        hub = self.service.hub
        for name, sub in list(self.subs.items()):
            hub.detach(sub)
            sub.channel = Channel(name, principal)
            sub.redact = principal.role == "customer"
            if name.startswith("order:"):
                order = await self.service.readers.run(Store.get_order, name[6:])
                if not can_see_order(principal, order) and self.subs.get(name) is sub:
                    self.drop_subscription(name)
                    self.push(protocol.reply("unsubscribed", None, channel=name))
        self.wake()

    def tick(self, now: float, wall: float, interval: float) -> None:
        """Keep-alive and expiry, checked by the service's sweep (no timer task per connection).

        A ping is written when the peer has been quiet for `interval`; any bytes from the peer
        (its pong included) answer it; no answer within `interval` closes the connection.
        """
        if self.principal is None or self.close_reason is not None:
            return
        if wall >= self.expires_at:
            self.close_soon(AUTH_CLOSE_CODE, auth.EXPIRED)
            return
        heard = self.stream.last_received
        if self.ping_sent_at is not None:
            if heard >= self.ping_sent_at:
                self.ping_sent_at = None
            elif now - self.ping_sent_at >= interval:
                self.close_soon(GOING_AWAY, "keep-alive ping not answered")
                return
        if self.ping_sent_at is None and now - heard >= interval and self.ws.closed is None:
            self.ping_sent_at = now
            try:
                self.writer.write(PING_FRAME)
            except trio.BrokenResourceError:
                self.wake()

    def _stop(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def close_soon(self, code: int, reason: str) -> None:
        if self._nursery is not None:
            try:
                self._nursery.start_soon(self.close, code, reason)
            except RuntimeError:  # already ended
                pass

    # sending replies ------------------------------------------------------------------

    def push(self, text: str) -> None:
        """Send one reply frame now (it queues behind earlier frames if the socket is full)."""
        if self.ws.closed is not None:
            return  # closing: nothing more goes out
        try:
            self.writer.write(text_frame(text.encode()))
        except trio.BrokenResourceError:
            self.wake()  # the send loop notices and ends the connection

    def write_frames(self, frames: list[bytes]) -> None:
        """Send event frames built by Hub.publish (see push)."""
        if self.ws.closed is not None:
            return
        try:
            self.writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except trio.BrokenResourceError:
            self.wake()

    def wake(self) -> None:
        """Something for the send loop to do: start it unless it runs (it rereads everything)."""
        if not self._sending and self._nursery is not None and self.close_reason is None:
            try:
                self._nursery.start_soon(self._guard, self._send_loop, False)
            except RuntimeError:  # the connection has ended; nothing more to send
                return
            self._sending = True

    def command_done(self, command_id: str, outcome: Ack | Rejected) -> None:
        self.inflight -= 1
        if isinstance(outcome, Ack):
            self.push(protocol.ack(command_id, outcome.seq, outcome.version, outcome.events, outcome.duplicate))
        else:
            self.push(protocol.error_from(outcome, command_id))
        self._space.set()

    async def _room(self) -> None:
        """Wait until the socket's queue and the commands in flight are under their limits."""
        while True:
            await self.writer.drain(HIGH_WATER)
            if self.inflight < MAX_INFLIGHT:
                return
            self._space = trio.Event()
            await self._space.wait()

    def drop_subscription(self, channel: str) -> bool:
        sub = self.subs.pop(channel, None)
        if sub is None:
            return False
        self.service.hub.detach(sub)
        self.service.metrics.subscriptions.labels(channel_kind(channel)).dec()
        return True

    # receiving ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """The messages that come the usual way (fragmented, binary, or sent before the fast path
        could take them); the others come to handle_fast. Ends when the WebSocket closes."""
        while True:
            await self._room()
            frame = await self.ws.get_message()
            try:
                await self._dispatch(protocol.parse_request(frame))
            except protocol.ClientError as exc:
                self.push(protocol.error(exc.code, exc.message, exc.request_id, exc.details))
            finally:
                self.stream.slow_messages -= 1

    def takes_fast(self) -> bool:
        """See wsfast.FastReceiver: after authentication, unless the connection has ended (the
        stream sends messages the usual way while earlier ones are still on it)."""
        return self.principal is not None and not self._ended

    async def handle_fast(self, text: str) -> None:
        """One message, in trio-websocket's reader task (wsfast.WriterStream): what the receive
        loop does for a message, and what _guard does when that fails. Never raises, except
        trio.Cancelled."""
        if self._closing or self.close_reason is not None or self.ws.closed is not None or self._ended:
            return  # closing: like trio-websocket, drop what comes after
        try:
            await self._room()
            try:
                await self._dispatch(protocol.parse_request(text))
            except protocol.ClientError as exc:
                self.push(protocol.error(exc.code, exc.message, exc.request_id, exc.details))
        except CloseConnection as exc:
            # Closing waits for the peer's close frame, which this very task reads: close from
            # another task, and drop what comes until then.
            self._closing = True
            self.close_soon(exc.code, exc.reason)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._lost(exc)
            self._stop()
        except Exception:
            log.exception("event=connection.crashed conn=%d", self.number)
            self._closing = True
            self.close_soon(1011, "internal error")

    async def _dispatch(self, request: protocol.ClientRequest) -> None:
        principal = self.principal
        assert principal is not None
        service = self.service
        if isinstance(request, protocol.CommandRequest):
            if not self._take_token():
                service.metrics.command(request.command.name, "rate_limited")
                raise protocol.ClientError("rate_limited", "too many commands; slow down and retry", request.id)
            try:
                validate(request.command)
                authorize(request.command, principal)
            except Rejected as exc:
                service.metrics.command(request.command.name, exc.code)
                raise protocol.ClientError(exc.code, exc.message, request.id, exc.details) from None
            self.inflight += 1
            pending = Pending(Request(principal, request.command, service.clock.now()), self)
            if not service.submit_nowait(pending):
                await service.submit(pending)
        elif isinstance(request, protocol.Subscribe):
            await self._subscribe(request, principal)
        elif isinstance(request, protocol.Unsubscribe):
            self.drop_subscription(request.channel)
            self.push(protocol.reply("unsubscribed", request.id, channel=request.channel))
        elif isinstance(request, protocol.Get):
            await self._get(request, principal)
        elif isinstance(request, protocol.Query):
            await self._query(request, principal)
        elif isinstance(request, protocol.Ping):
            self.push(protocol.reply("pong", request.id, head=service.hub.head))
        elif isinstance(request, protocol.Auth):
            self._accept_token(request.token, request.id)
            if self.principal.role != principal.role:
                await self._retarget_subscriptions()

    def _take_token(self) -> bool:
        settings = self.service.settings
        now = time.monotonic()
        self._tokens = min(settings.rate_burst, self._tokens + (now - self._refilled) * settings.rate_limit)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _subscribe(self, request: protocol.Subscribe, principal: Principal) -> None:
        service = self.service
        if request.channel.startswith("order:"):
            order_id = request.channel[6:]
            order = await service.readers.run(Store.get_order, order_id)
            if not can_see_order(principal, order):
                raise protocol.ClientError("not_found", f"order {order_id!r} not found", request.id)
        head = service.hub.head
        if request.log_id is not None and request.log_id != service.log_id:
            raise protocol.ClientError("resync_required", "log_id is not this log's: drop your state and start over "
                                       "from since 0", request.id, {"log_id": service.log_id, "head": head})
        if request.since is not None and request.since > head:
            raise protocol.ClientError("resync_required", f"since {request.since} is beyond the head {head}: this "
                                       "log is not the one you read; start over from since 0", request.id,
                                       {"log_id": service.log_id, "head": head})
        if request.channel not in self.subs and len(self.subs) >= service.settings.max_subscriptions:
            raise protocol.ClientError("rate_limited", f"at most {service.settings.max_subscriptions} subscriptions "
                                       "per connection", request.id)
        since = head if request.since is None else request.since
        self.drop_subscription(request.channel)
        self.push(protocol.reply("subscribed", request.id, channel=request.channel, since=since, head=head))
        self.subs[request.channel] = Subscription(self, Channel(request.channel, principal), since, since, head)
        service.metrics.subscriptions.labels(channel_kind(request.channel)).inc()
        self.wake()

    async def _get(self, request: protocol.Get, principal: Principal) -> None:
        readers = self.service.readers
        if request.order_id is not None:
            order = await readers.run(Store.get_order, request.order_id)
            if not can_see_order(principal, order):
                raise protocol.ClientError("not_found", f"order {request.order_id!r} not found", request.id)
            self.push(protocol.reply("order", request.id, order=order.to_json()))
        else:
            stock = await readers.run(Store.get_stock, request.sku)
            if stock is None:
                raise protocol.ClientError("not_found", f"sku {request.sku!r} not found", request.id)
            self.push(protocol.reply("stock", request.id, stock=stock.to_json()))

    async def _query(self, request: protocol.Query, principal: Principal) -> None:
        if not auth.can_query(principal):
            raise protocol.ClientError("forbidden", "query is for staff and auditors", request.id)
        events = await self.service.readers.run(Store.read_events, request.filter, request.limit + 1)
        more = len(events) > request.limit
        events = events[: request.limit]
        self.push(protocol.reply("result", request.id, events=[event_json(e) for e in events],
                                 next=events[-1].seq if more else None))

    # sending --------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """Bring every detached subscription up to the head, then attach it to the hub; end when
        all are attached (an idle connection keeps no sending task).

        Replies do not pass through here (they are written at once); this loop only sends
        catch-up pages and `live` markers, waiting for the socket to drain between pages.
        """
        hub = self.service.hub
        try:
            while True:
                await self.writer.drain(HIGH_WATER)
                progressed = False
                for sub in list(self.subs.values()):
                    if sub.attached:
                        continue
                    if not sub.live_sent and sub.cursor >= sub.head:
                        sub.live_sent = True
                        self.push(protocol.encode({"type": "live", "channel": sub.channel.name, "seq": sub.cursor}))
                        progressed = True
                    elif sub.cursor < hub.head:
                        await self._advance(sub)
                        progressed = True
                    elif self.subs.get(sub.channel.name) is sub:
                        hub.attach(sub)  # caught up: from now on Hub.publish feeds it
                if self.writer.error is not None:
                    raise ConnectionClosed(None)
                if not progressed:
                    return
        finally:
            self._sending = False

    async def _advance(self, sub: Subscription) -> None:
        """Send the next page of what `sub` has not seen yet, from the window or SQLite."""
        hub = self.service.hub
        window = hub.window
        channel = sub.channel
        if window.covers(sub.cursor):
            events = window.after(sub.cursor, WINDOW_PAGE)
            cursor = events[-1].seq
            frames, prev = channel_frames(channel, events, sub.prev)
        else:
            until = hub.head
            frames, prev = await self.service.readers.run(Store.read_frames, channel, sub.cursor, until,
                                                          CATCHUP_PAGE, sub.prev)
            cursor = until if len(frames) < CATCHUP_PAGE else prev
            if self.subs.get(channel.name) is not sub or sub.attached:
                return  # replaced or unsubscribed while reading
        if frames:
            sub.prev = prev
            self.write_frames(frames)
        sub.cursor = cursor


# -- running the server ------------------------------------------------------------------------


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def serve(settings: Settings, *, stop: trio.Event | None = None, handle_signals: bool = True,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the service until `stop` is set or SIGINT/SIGTERM arrives; `task_status.started(url)`
    once listening. Then: stop accepting, close every connection with 1001, let the writer
    finish what it was handed, checkpoint the WAL and return."""
    _raise_fd_limit(settings.max_connections + 64)
    service = Service(settings)
    try:
        await _serve(service, stop if stop is not None else trio.Event(), handle_signals, task_status)
    finally:
        service.close()


async def _serve(service: Service, stop: trio.Event, handle_signals: bool, task_status) -> None:
    settings = service.settings
    context = ssl_context(settings)
    async with trio.open_nursery() as outer:
        await outer.start(service.writer)
        outer.start_soon(service.sweep)
        if handle_signals:
            outer.start_soon(_wait_for_signal, stop)
        async with trio.open_nursery() as connections:
            listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
            if context is not None:
                listeners = [trio.SSLListener(l, context, https_compatible=True) for l in listeners]
            listen_scope = trio.CancelScope()

            async def run_listener(task_status=trio.TASK_STATUS_IGNORED):
                with listen_scope:
                    await trio.serve_listeners(service.handle_tcp, listeners, handler_nursery=connections,
                                               task_status=task_status)

            await connections.start(run_listener)
            port = listeners[0].socket.getsockname()[1] if context is None else listeners[0].transport_listener.socket.getsockname()[1]
            scheme = "wss" if context is not None else "ws"
            url = f"{scheme}://{_url_host(settings.host)}:{port}{WS_PATH}"
            log.info("event=listening url=%s log_id=%s head=%d db=%s", url, service.log_id, service.hub.head,
                     settings.db)
            task_status.started(url)
            await stop.wait()
            # Stop accepting, close every connection with 1001, then let the writer finish.
            service.stopping = True
            listen_scope.cancel()
            with trio.move_on_after(5):
                await service.close_all(GOING_AWAY, "server shutting down")
            connections.cancel_scope.cancel()
        await service._send_commands.aclose()
        with trio.move_on_after(3):
            while service.writer_alive:
                await trio.sleep(0.01)
        outer.cancel_scope.cancel()
    log.info("event=stopped head=%d", service.hub.head)


async def _wait_for_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("event=shutdown signal=%s", signal.Signals(signum).name)
            stop.set()
            return


def _raise_fd_limit(wanted: int) -> None:
    """Let the process hold `wanted` sockets if the hard limit allows (the soft one is often 1024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
