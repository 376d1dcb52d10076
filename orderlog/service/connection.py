"""One WebSocket connection: authentication, requests, subscriptions (cursors on the log
moved by its send loop until they are attached to the hub), keep-alive and token expiry."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .. import auth, protocol
from ..auth import AUTH_CLOSE_CODE, AuthError
from ..canonical import event_json
from ..domain import ErrorCode, Principal, Rejected, Role, authorize, can_see_order, validate
from ..feed import RESYNC_MESSAGES, Channel, FeedEvent, channel_frames, hash_sent, resume_refusal
from ..records import Ack, Request
from ..snapshot import SnapshotPager
from ..store import lost_database_errors, snapshots
from ..wire import text_frame
from .hub import Subscription
from .metrics import channel_kind
from .sockets import HIGH_WATER, WriterStream
from .writer import Pending

if TYPE_CHECKING:
    from .app import Service

log = logging.getLogger("orderlog")

GOING_AWAY = 1001
DATABASE_LOST = (1013, "database unavailable, try again")  # RFC 6455 1013: try again later
CATCHUP_PAGE = 500  # events read from SQLite per catch-up step
WINDOW_PAGE = 500  # events taken from the window per send-loop step
MAX_INFLIGHT = 256  # commands of one connection waiting for their ack
# While commands commit (one did in the last SNAPSHOT_BUSY seconds), a snapshot pauses after each
# page for SNAPSHOT_YIELD times the time the page took to read: its reads then take at most 4/7 of
# the wall time, and on 2 cores 50 other clients kept about 0.85x their command rate while the
# snapshot still streamed 45,000-70,000 rows/s (README, "Snapshots and the dashboard"); with no
# commands it runs at full speed.
SNAPSHOT_BUSY = 0.1
SNAPSHOT_YIELD = 0.75
CLOSE_TIMEOUT = 2.0  # seconds to wait for a client's close handshake
PING_FRAME = b"\x89\x04ping"  # an unmasked ping frame with a 4-byte payload


class CloseConnection(Exception):
    """Raised inside a connection's tasks to close it with a code and reason."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


def _timed_page(store: Any, *args: Any) -> tuple[Any, float]:
    """`snapshots.read_page` and the seconds it took (in the reader's thread: not its wait for one)."""
    started = time.perf_counter()
    return snapshots.read_page(store, *args), time.perf_counter() - started


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
        self.admitted: str | None = None  # the user Service.admit let in (its per-user slot)
        self.expires_at = 0.0
        self.subs: dict[str, Subscription] = {}
        self.snapshots: dict[str, trio.CancelScope] = {}  # channels whose snapshot is being sent
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
        self._held: set[str] = set()  # `order:` channels not advanced until a refresh's check (_retarget_subscriptions)
        stream.receiver = self  # simple text messages come to handle_fast (sockets.WriterStream)

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
        except Exception as exc:
            if not isinstance(exc, lost_database_errors()):
                raise
            self._database_lost(exc)
            await self.close(*DATABASE_LOST)
            return
        if stop_after:
            self._stop()

    def _lost(self, exc: BaseException) -> None:
        """Note why the connection ended: the peer's close, or (the socket died under a direct
        write, the peer reset it) a close without a handshake."""
        violation = self.stream.violation
        if violation is not None:  # we failed the connection: the code we sent (sockets.WriterStream)
            reason = (violation.code, violation.reason)
        elif isinstance(exc, ConnectionClosed):
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
                self.stream.slow_message_done()
                try:
                    message = protocol.parse_json_object(first)
                except protocol.ClientError:
                    message = None
                if not message or message.get("type") != "auth":
                    raise CloseConnection(AUTH_CLOSE_CODE, auth.REQUIRED)
                token = message.get("token")
                request_id = protocol.request_id(message)  # echoed in `welcome` only if it can be
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
        if first:
            refused = self.service.admit(claims.principal.user)
            if refused is not None:
                log.info("event=connection.refused conn=%d user=%s code=%d reason=%r", self.number,
                         claims.principal.user, *refused)
                raise CloseConnection(*refused)
            self.admitted = claims.principal.user
        self.principal = claims.principal
        self.expires_at = claims.expires_at
        if first:
            log.info("event=connection.auth conn=%d user=%s role=%s", self.number, claims.principal.user,
                     claims.principal.role)
        self.push(protocol.reply(
            "welcome", request_id, user=claims.principal.user, role=claims.principal.role,
            head=self.service.hub.head, head_hash=self.service.hub.head_hash, log_id=self.service.log_id,
            expires_at=auth.rfc3339(claims.expires_at),
        ))

    async def _retarget_subscriptions(self) -> None:
        """After a refresh changed the role: every open subscription now sees what the new role
        may see, from where it was; an `order:` channel the new role may not read is closed with
        an unsolicited `unsubscribed`."""
        principal = self.principal
        assert principal is not None
        hub = self.service.hub
        for name in list(self.snapshots):  # rows read for the old role: that snapshot is void
            self.drop_subscription(name)
            self.push(protocol.reply("unsubscribed", None, channel=name))
        # Every channel takes the new role at once, before any await: the writer publishes
        # meanwhile, and a customer's feed must not carry one more event of the old role. An
        # `order:` channel stays held (neither fed nor advanced) until its order is checked.
        for name, sub in list(self.subs.items()):
            hub.detach(sub)
            sub.channel = Channel(name, principal)
            sub.redact = principal.role == Role.CUSTOMER
            if name.startswith("order:"):
                self._held.add(name)
        held = [(name, self.subs[name]) for name in sorted(self._held)]
        try:
            for name, sub in held:
                order = await self.service.readers.call("get_order", name[6:])
                if not can_see_order(principal, order) and self.subs.get(name) is sub:
                    self.drop_subscription(name)
                    self.push(protocol.reply("unsubscribed", None, channel=name))
        finally:
            self._held.clear()
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

    def close_soon(self, code: int, reason: str) -> bool:
        """Close from within this connection's nursery; False if it has none (yet or any more)."""
        if self._nursery is not None:
            try:
                self._nursery.start_soon(self.close, code, reason)
                return True
            except RuntimeError:  # already ended
                pass
        return False

    # sending replies ------------------------------------------------------------------

    def push(self, text: str) -> None:
        """Send one reply frame now (it queues behind earlier frames if the socket is full)."""
        if self.ws.closed is not None:
            return  # closing: nothing more goes out
        try:
            self.writer.write(text_frame(text.encode()))
        except trio.BrokenResourceError:
            self.wake()  # the send loop notices and ends the connection

    def write_frame(self, frame: bytes) -> None:
        """Send one event frame built by Hub.publish (see push)."""
        if self.ws.closed is not None:
            return
        try:
            self.writer.write(frame)
        except trio.BrokenResourceError:
            self.wake()

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
        sending = self.snapshots.pop(channel, None)
        if sending is not None:
            sending.cancel()
            self.service.metrics.subscriptions.labels(channel_kind(channel)).dec()
        sub = self.subs.pop(channel, None)
        if sub is None:
            return sending is not None
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
                self.stream.slow_message_done()

    def takes_fast(self) -> bool:
        """See sockets.FastReceiver: after authentication, unless the connection has ended (the
        stream sends messages the usual way while earlier ones are still on it)."""
        return self.principal is not None and not self._ended

    async def handle_fast(self, text: str) -> None:
        """One message, in trio-websocket's reader task (sockets.WriterStream): what the receive
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
        except Exception as exc:
            self._closing = True
            if isinstance(exc, lost_database_errors()):
                self._database_lost(exc)
                self.close_soon(*DATABASE_LOST)
            else:
                log.exception("event=connection.crashed conn=%d", self.number)
                self.close_soon(1011, "internal error")

    def _database_lost(self, exc: Exception) -> None:
        """The database went away under one of this connection's reads: one line, no traceback."""
        log.warning("event=connection.database_lost conn=%d error=%s", self.number, type(exc).__name__)

    async def _dispatch(self, request: protocol.ClientRequest) -> None:
        principal = self.principal
        assert principal is not None
        service = self.service
        if isinstance(request, protocol.CommandRequest):
            if not self._take_token() or not service.users.take_command(principal.user, time.monotonic()):
                service.metrics.command(request.command.name, ErrorCode.RATE_LIMITED)
                raise protocol.ClientError(ErrorCode.RATE_LIMITED, "too many commands; slow down and retry", request.id)
            try:
                validate(request.command)
                authorize(request.command, principal)
                if service.stopping:  # the writer only finishes what it holds; the close follows
                    raise Rejected(ErrorCode.UNAVAILABLE, "the server is shutting down; the command was not applied, "
                                   "send it again once it is back")
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
            self.push(protocol.reply("pong", request.id, head=service.hub.head, head_hash=service.hub.head_hash))
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
            order = await service.readers.call("get_order", order_id)
            if not can_see_order(principal, order):
                raise protocol.ClientError(ErrorCode.NOT_FOUND, f"order {order_id!r} not found", request.id)
        head = service.hub.head
        if request.since is not None and request.since > head:
            head = await service.caught_up_to(request.since)  # committed through another node?
        await self._require_history(request.id, principal, head, request.log_id, request.since, request.anchor)
        open_channels = len(self.subs) + len(self.snapshots)
        if request.channel not in self.subs and request.channel not in self.snapshots \
                and open_channels >= service.settings.max_subscriptions:
            raise protocol.ClientError(ErrorCode.RATE_LIMITED, f"at most {service.settings.max_subscriptions} subscriptions "
                                       "per connection", request.id)
        if request.snapshot:
            await self._subscribe_snapshot(request, principal)
            return
        since = head if request.since is None else request.since
        self.drop_subscription(request.channel)
        self.push(protocol.reply("subscribed", request.id, channel=request.channel, since=since, head=head))
        self.subs[request.channel] = Subscription(self, Channel(request.channel, principal), since, since, head)
        service.metrics.subscriptions.labels(channel_kind(request.channel)).inc()
        self.wake()

    async def _subscribe_snapshot(self, request: protocol.Subscribe, principal: Principal) -> None:
        """`subscribe` with `snapshot: true`: the rows as of N (the head one read transaction saw),
        then the events after N as for `since: N`. The first page is read here; the others, and
        the switch to the feed, in a task of the connection (`_send_snapshot`)."""
        channel = Channel(request.channel, principal)
        seq, total, rows, more = await self.service.readers.run(snapshots.first_page, channel,
                                                                  self.service.settings.snapshot_page)
        # The hash of event N (as this user's feeds carry it), so that the client can anchor a
        # later resume on the snapshot it holds (docs/protocol.md section 3, "Anchored resume").
        anchored = await self._event_at(seq) if seq else None
        self.drop_subscription(request.channel)
        self.push(protocol.reply("subscribed", request.id, channel=request.channel, since=seq, head=seq,
                                 snapshot=True, hash=hash_sent(anchored, principal) if anchored else None))
        scope = trio.CancelScope()
        self.snapshots[request.channel] = scope
        self.service.metrics.subscriptions.labels(channel_kind(request.channel)).inc()
        pager = SnapshotPager(request.channel, seq, total)
        self._write_snapshot(pager.add_pieces(rows))
        assert self._nursery is not None
        self._nursery.start_soon(self._guard, lambda: self._send_snapshot(scope, channel, pager, seq, more), False)

    def _write_snapshot(self, frames: list[bytes]) -> None:
        if frames:
            self.write_frames([text_frame(f) for f in frames])

    async def _send_snapshot(self, scope: trio.CancelScope, channel: Channel, pager: SnapshotPager, seq: int,
                             more: str | None) -> None:
        """The rest of a snapshot, a page at a time as the socket drains (so memory holds one page,
        and no read transaction stays open while the client is slow); then the subscription
        from `since: N`, once the hub has published N."""
        name = channel.name
        with scope:
            while more is not None:
                # The next page is read while the socket sends the last one; then written once
                # the socket's queue is under HIGH_WATER.
                (rows, more), spent = await self.service.readers.run_bulk(_timed_page, channel, seq, more,
                                                                          self.service.settings.snapshot_page)
                await self.writer.drain(HIGH_WATER)
                self._write_snapshot(pager.add_pieces(rows))
                if trio.current_time() - self.service.last_commit < SNAPSHOT_BUSY:
                    await trio.sleep(spent * SNAPSHOT_YIELD)  # commands are flowing: let them have the CPU
            self._write_snapshot([pager.finish()])
            await self.service.hub.reached(seq)
            if self.snapshots.get(name) is not scope:
                return
            del self.snapshots[name]
            # `live` once the events up to today's head have followed (>= N, which `subscribed` said).
            self.subs[name] = Subscription(self, channel, seq, seq, self.service.hub.head)
            self.wake()

    async def _require_history(self, request_id: str | None, principal: Principal, head: int, log_id: str | None,
                               since: int | None, anchor: protocol.Anchor | None) -> None:
        """Raise `resync_required` unless the history the request names (its log_id, the seq it
        holds, its anchor) is a prefix of this log (feed.resume_refusal)."""
        anchored = await self._event_at(anchor.seq) if anchor is not None and anchor.seq <= head else None
        refusal = resume_refusal(principal, self.service.log_id, head, log_id, since,
                                 (anchor.seq, anchor.hash) if anchor is not None else None, anchored)
        if refusal is not None:
            message = RESYNC_MESSAGES[refusal].format(since=since, head=head, seq=anchor.seq if anchor else None)
            raise protocol.ClientError(ErrorCode.RESYNC_REQUIRED, message, request_id,
                                       {"log_id": self.service.log_id, "head": head, "reason": refusal})

    async def _event_at(self, seq: int) -> FeedEvent | None:
        """This log's committed event `seq`, from the window when it holds it (None if none)."""
        window = self.service.hub.window
        if window.covers(seq - 1) and seq <= window.head:
            events = window.after(seq - 1, 1)
        else:
            events = await self.service.readers.call("read_feed", None, seq - 1, seq, 1)
        return events[0] if events else None

    async def _get(self, request: protocol.Get, principal: Principal) -> None:
        readers = self.service.readers
        as_of = request.as_of
        head = self.service.hub.head
        if request.anchor is not None:  # the client holds `as_of`: is its history this log's?
            await self._require_history(request.id, principal, head, None, None, request.anchor)
        if as_of is not None and as_of > head:
            raise protocol.ClientError(ErrorCode.BAD_REQUEST, f"as_of {as_of} is beyond the head {head}", request.id,
                                       {"head": head})
        if request.order_id is not None:
            if as_of is None:
                order = await readers.call("get_order", request.order_id)
            else:
                order = await readers.run(snapshots.order_at, request.order_id, as_of)
            if not can_see_order(principal, order):
                raise protocol.ClientError(ErrorCode.NOT_FOUND, f"order {request.order_id!r} not found", request.id)
            self.push(protocol.reply("order", request.id, order=order.to_json()))
        else:
            if as_of is None:
                stock = await readers.call("get_stock", request.sku)
            else:
                stock = await readers.run(snapshots.stock_at, request.sku, as_of)
            if stock is None:
                raise protocol.ClientError(ErrorCode.NOT_FOUND, f"sku {request.sku!r} not found", request.id)
            self.push(protocol.reply("stock", request.id, stock=stock.to_json()))

    async def _query(self, request: protocol.Query, principal: Principal) -> None:
        if not auth.can_query(principal):
            raise protocol.ClientError(ErrorCode.FORBIDDEN, "query is for staff and auditors", request.id)
        events = await self.service.readers.call("read_events", request.filter, request.limit + 1)
        more = len(events) > request.limit
        events = events[: request.limit]
        self.push(protocol.reply("result", request.id, events=[event_json(e) for e in events],
                                 next=events[-1].seq if more else None))
        await self._pace_replay(principal.user, len(events))  # paging through `query` is a replay too

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
                    if sub.attached or sub.channel.name in self._held:
                        continue
                    if not sub.live_sent and sub.cursor >= sub.live_at:
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
            frames, prev = await self.service.readers.call("read_frames", channel, sub.cursor, until,
                                                          CATCHUP_PAGE, sub.prev)
            cursor = until if len(frames) < CATCHUP_PAGE else prev
            if self.subs.get(channel.name) is not sub or sub.attached:
                return  # replaced or unsubscribed while reading
        if frames:
            sub.prev = prev
            self.write_frames(frames)
        sub.cursor = cursor
        await self._pace_replay(channel.principal.user, len(frames))

    async def _pace_replay(self, user: str, events: int) -> None:
        """Replays beyond the user's rate are slowed down, never refused or cut (orderlog.limits):
        after sending `events` old events, pause as long as the user's budget says."""
        pause = self.service.users.replay_delay(user, events, time.monotonic())
        if pause > 0:
            await trio.sleep(pause)
