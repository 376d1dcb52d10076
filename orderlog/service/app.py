"""The service: the writer pipeline, the sweep, and the accepting side of connections (HTTP or
WebSocket), over one store.

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
import time
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream

from .. import protocol
from ..domain import ErrorCode, Rejected
from ..limits import Slots, UserLimits
from ..feed import FeedEvent, feed_event
from ..records import Ack, BatchResult, Request
from ..store import Unavailable, open_store
from ..store import checkpoints as stored_checkpoints
from . import gcpolicy, http
from .checkpointing import Checkpointer
from .connection import CLOSE_TIMEOUT, Connection
from .hub import Hub
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .settings import Settings
from .sockets import SocketWriter, WriterStream
from .writer import Clock, Committed, InThread, Pending, Readers

log = logging.getLogger("orderlog")

WS_PATH = "/v1/ws"
MAX_BATCH = 2000  # commands per group commit
WRITER_QUEUE = 10_000  # commands waiting for the writer before senders block
EXTERNAL_POLL = 1.0  # seconds between looks for events written by another process
SWEEP_PERIOD = 0.25  # seconds between checks of pings and token expiry
RECEIVE_BUFFER = 64 * 1024  # bytes per socket read
CATCH_UP_WAIT = 5.0  # seconds a subscribe may wait for this node to read a seq another node committed
PUBLISH_LIMIT = 100_000  # events read back per commit; the rest on the writer's next turn
DRAIN_POLL = 0.005  # seconds between looks while shutting down
ORIGIN_REFUSED = b"origin not allowed\n"
POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013
TOO_MANY_CONNECTIONS = "too many connections"  # the user holds max_user_connections already
SERVER_BUSY = "server busy"  # every slot for authenticated connections is taken


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = open_store(settings.db, create=True, synchronous=settings.synchronous)
        self.log_id = self.store.log_id
        self.readers = Readers(settings.db)
        head, head_hash = stored_checkpoints.head(self.store)
        self.hub = Hub(head, settings.window, head_hash)
        self.connections: set[Connection] = set()
        self._ids = itertools.count(1)
        self._send_commands, self._receive_commands = trio.open_memory_channel[Pending](WRITER_QUEUE)
        self.writer_alive = False
        self.stopping = False
        self._behind = False  # the last publish stopped at PUBLISH_LIMIT: read on at once
        self._read_head = self.hub.head  # the last event a commit returned (published or about to be)
        self._woken = False  # another node announced a head past _read_head: read the log at once
        self._idle: trio.CancelScope | None = None  # the writer's wait for a command, while it waits
        self._listener = None  # the store's wake-up from other nodes (PostgreSQL), while the writer runs
        self.write_error: str | None = None  # why the last commit failed, until one succeeds
        self.last_commit = float("-inf")  # trio.current_time() when a batch of commands last committed
        self.metrics = Metrics(head=lambda: self.hub.head, lag=self.max_lag)
        self.clock = Clock()
        self.checkpointer = (Checkpointer(self.store, settings.checkpoint_key, settings.checkpoint_every)
                             if settings.checkpoint_key is not None else None)
        self.routes = {"/healthz": self._healthz, "/metrics": self._metrics, "/v1/checkpoint": self._checkpoint}
        self.slots = Slots(settings.max_connections, settings.handshake_share)
        self.users = UserLimits(settings.max_user_connections, settings.user_rate_limit, settings.user_rate_burst,
                                settings.user_replay_rate, settings.user_replay_burst)

    def admit(self, user: str) -> tuple[int, str] | None:
        """A connection authenticated as `user`: None if it may stay (then `leave` must follow),
        else the close code and reason (PROTOCOL.md section 6, "Per-user limits")."""
        now = time.monotonic()
        if not self.users.connect(user, now):
            return POLICY_VIOLATION, TOO_MANY_CONNECTIONS
        if not self.slots.authenticate():
            self.users.disconnect(user, now)
            return TRY_AGAIN_LATER, SERVER_BUSY
        return None

    def leave(self, user: str | None) -> None:
        """A connection ends: `user` if `admit` let it in, else None (it was a handshake)."""
        self.slots.close(user is not None)
        if user is not None:
            self.users.disconnect(user, time.monotonic())

    def max_lag(self) -> int:
        head = self.hub.head
        # An attached subscription is fed from each commit: its cursor is the head, not `sub.cursor`.
        return max((0 if sub.attached else head - sub.cursor for c in self.connections for sub in c.subs.values()),
                   default=0)

    def health(self) -> tuple[bool, dict]:
        ok = self.writer_alive and not self.stopping and self.write_error is None
        body = {"status": "ok" if ok else "unavailable", "head": self.hub.head, "head_hash": self.hub.head_hash,
                "log_id": self.log_id,
                "writer": "alive" if self.writer_alive else "stopped", "writable": self.write_error is None,
                "connections": len(self.connections)}
        if self.write_error is not None:
            body["error"] = self.write_error
        return ok, body

    async def _healthz(self, request_head: http.RequestHead) -> bytes:
        ok, body = self.health()
        return http.response(200 if ok else 503, (protocol.encode(body) + "\n").encode(), "application/json")

    async def _checkpoint(self, request_head: http.RequestHead) -> bytes:
        jws = self.checkpointer.latest if self.checkpointer is not None else None
        if jws is None:
            why = "no checkpoint signed yet" if self.checkpointer is not None else "this server signs no checkpoints"
            return http.response(404, f"{why}\n".encode())
        return http.response(200, (protocol.encode({"checkpoint": jws}) + "\n").encode(), "application/json")

    async def _metrics(self, request_head: http.RequestHead) -> bytes:
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
        """Commit `requests` (in the worker thread); their outcomes, and the events to publish
        after the seq `after` (read back when they are not all ours)."""
        result = self.store.execute_batch(requests) if requests else BatchResult([])
        rows = result.appended
        if rows and rows[0].seq == after + 1 and len(rows) <= PUBLISH_LIMIT:
            events = [feed_event(row) for row in rows]  # ours, straight after the head
        else:
            # Read back what is committed: events of another process, or before ours.
            events = self.store.read_feed(None, after, 2**62, PUBLISH_LIMIT)
        if self.checkpointer is not None:
            self.checkpointer.after_commit(events)
        return result.outcomes, events

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
        self._listen()
        task_status.started()
        committed: Committed | None = None  # committed, not yet published and acked
        try:
            while True:
                batch: list[Pending] = []
                closed = False
                if committed is None:  # nothing to do meanwhile: wait for a command (or poll)
                    with trio.move_on_after(0 if self._behind or self._woken else EXTERNAL_POLL) as self._idle:
                        try:
                            batch.append(await self._receive_commands.receive())
                        except trio.EndOfChannel:
                            return
                    self._idle = None
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
                    self._woken = False  # this commit reads every event committed before it
                    commit = InThread(self._commit, [p.request for p in batch], self._read_head)
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

    def _listen(self) -> None:
        """Start the store's wake-up from other nodes, if it has one (PostgreSQL's LISTEN thread;
        a SQLite file has no other writer worth waking for: the writer's poll finds theirs)."""
        watch = getattr(self.store, "watch_head", None)
        if watch is None:
            return
        token = trio.lowlevel.current_trio_token()

        def on_head(seq: int) -> None:  # in the listener's thread
            try:
                token.run_sync_soon(self._wake, seq)
            except trio.RunFinishedError:
                pass

        self._listener = watch(on_head)

    async def caught_up_to(self, seq: int) -> int:
        """This node's head, once it has read `seq` if the log holds it already: a client that saw
        `seq` on another node a moment ago may ask for it before this node was woken for it (or
        before its next poll). Returns the head as it is when the log does not hold `seq`."""
        if seq <= self.hub.head:
            return self.hub.head
        committed = await self.readers.call("head")
        if committed < seq:
            return self.hub.head
        self._wake(committed)
        with trio.move_on_after(CATCH_UP_WAIT):
            while self.hub.head < seq:
                await trio.sleep(0.005)
        return self.hub.head

    def _wake(self, seq: int) -> None:
        """Another node committed up to `seq` (0: unknown): read the log now, not at the next poll."""
        if seq == 0 or seq > self._read_head:
            self._woken = True
            if self._idle is not None:
                self._idle.cancel()

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

    async def _committed(self, batch: list[Pending], commit: InThread, started: float) -> "Committed":
        """The outcome of `commit` (running `batch`): acks and events, or the same rejection for all."""
        try:
            outcomes, events = await commit.wait()
            if batch:
                self.write_error = None
        except Unavailable as exc:
            log.error("event=commit.failed commands=%d reason=%r", len(batch), str(exc))
            self.write_error = str(exc)
            outcomes = [Rejected(ErrorCode.UNAVAILABLE, f"the log cannot be written right now ({exc}); retry later")] * len(batch)
            events = []
        except Exception:
            log.exception("event=commit.crashed commands=%d", len(batch))
            outcomes = [Rejected(ErrorCode.INTERNAL, "internal error; the command was not applied")] * len(batch)
            events = []
        if batch:
            self.last_commit = trio.current_time()
            self.metrics.batch_size.observe(len(batch))
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
        if events:
            self._read_head = events[-1].seq
        self._behind = len(events) >= PUBLISH_LIMIT
        return Committed(batch, outcomes, events)

    def _finish(self, committed: "Committed") -> None:
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
        request_head = None  # stays None when the handshake timeout cuts the read short (slowloris)
        try:
            with trio.move_on_after(settings.handshake_timeout):
                try:
                    request_head = await http.read_request_head(stream)
                    if request_head is not None and _request_head_size(request_head.raw) > http.MAX_REQUEST_HEAD_BYTES:
                        raise http.BadRequestHead(431, "request head too large")
                except http.BadRequestHead as exc:
                    await stream.send_all(http.response(exc.status, f"{exc}\n".encode()))
                    request_head = None
                if request_head is not None and not request_head.is_websocket:
                    if (urlsplit(request_head.target).path == WS_PATH and
                            self.origin_refused(request_head.headers.get("origin"))):
                        # Same answer as the handshake gets: a page can learn (with a POST, which
                        # carries its Origin) why its WebSocket never opens; browsers hide the 403.
                        answer = http.response(403, ORIGIN_REFUSED)
                        if request_head.method == "HEAD":
                            answer = http.without_body(answer)
                    else:
                        answer = await http.answer_http(request_head, self.routes, WS_PATH)
                    await stream.send_all(answer)
                    request_head = None
            if request_head is None:
                return
            async with trio.open_nursery() as nursery:
                writer = SocketWriter(stream, nursery)
                ws_stream = WriterStream(stream, writer, request_head.raw, settings.max_message_size)
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
        if self.origin_refused(origin):
            log.info("event=handshake.rejected status=403 reason=origin origin=%r", origin[:200])
            await request.reject(403, body=ORIGIN_REFUSED)
            return
        if self.stopping or not self.slots.open():
            await request.reject(503, body=b"server busy: too many connections\n")
            return
        try:
            token = _handshake_token(target.query, headers.get("authorization"))
            ws = await request.accept()
        except BaseException:
            self.leave(None)
            raise
        stream.accepted.set()
        connection = Connection(self, ws, stream, next(self._ids), token, remote)
        self.connections.add(connection)
        self.metrics.connections.inc()
        try:
            await connection.run()
        finally:
            self.leave(connection.admitted)
            self.connections.discard(connection)
            self.metrics.connections.dec()
            gcpolicy.connection_closed()
            for channel in list(connection.subs):
                connection.drop_subscription(channel)
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await ws.aclose()

    def commands_in_flight(self) -> int:
        """Commands handed to the writer (or on their way) whose ack or error is not sent yet."""
        return sum(connection.inflight for connection in self.connections)

    async def drain_commands(self) -> None:
        """Wait until every command received so far is committed and answered (or the writer
        has stopped): on shutdown, the acks of the last batch go out before the close."""
        while self.writer_alive and self.commands_in_flight():
            await trio.sleep(DRAIN_POLL)

    def origin_refused(self, origin: str | None) -> bool:
        """A browser page from an origin not on the allow-list (no Origin header: not a browser)."""
        allowed = self.settings.allow_origins
        return bool(allowed) and origin is not None and origin not in allowed

    async def close_all(self, code: int, reason: str) -> None:
        """Close every connection with `code` and wait until they have ended.

        Each close runs inside its connection, which ends only after the peer's close frame
        (or CLOSE_TIMEOUT): closing the socket while the peer still sends would reset it, and
        the peer would lose the replies it had not read yet.
        """
        async with trio.open_nursery() as nursery:
            for connection in list(self.connections):
                if not connection.close_soon(code, reason):
                    nursery.start_soon(connection.close, code, reason)
            while self.connections:
                await trio.sleep(DRAIN_POLL)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
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


def _request_head_size(raw: bytes) -> int:
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
