"""The hub: the committed head, the window of recent events, and the subscriptions fed
straight from each commit (see `Hub`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from ..domain import Role
from ..feed import Channel, FeedEvent, Window
from .sockets import HIGH_WATER

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("orderlog")


@attrs.define(eq=False, slots=True)
class Subscription:
    connection: "Connection"
    channel: Channel
    cursor: int  # every visible event with seq <= cursor has been sent (while detached)
    prev: int  # seq of the last event sent (or `since`)
    live_at: int  # the head at subscribe (subscribed.head): `live` comes once cursor >= it
    live_sent: bool = False
    attached: bool = False  # fed by Hub.publish; its cursor is then the hub's head
    channel_json: bytes = b""
    redact: bool = False  # a customer: other customers' order ids are left out of inventory

    def __attrs_post_init__(self) -> None:
        self.channel_json = self.channel.json_name
        self.redact = self.channel.principal.role == Role.CUSTOMER


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

    def __init__(self, head: int, size: int, head_hash: str | None = None):
        self.window = Window(head, size)
        self.head_hash = head_hash  # the hash of event `head` (None for an empty log)
        self.staff_orders: set[Subscription] = set()
        self.customer_orders: dict[str, set[Subscription]] = {}
        self.inventory: set[Subscription] = set()
        self.streams: dict[str, set[Subscription]] = {}
        self._waiters: list[tuple[int, trio.Event]] = []  # (seq, set once the head reaches it)

    async def reached(self, seq: int) -> None:
        """Return once the head is >= seq (a reader may see a commit before it is published)."""
        if self.head >= seq:
            return
        event = trio.Event()
        self._waiters.append((seq, event))
        await event.wait()

    @property
    def head(self) -> int:
        return self.window.head

    def _index(self, sub: "Subscription") -> set:
        name = sub.channel.name
        if name == "orders":
            if sub.channel.principal.role == Role.CUSTOMER:
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
            if name == "orders" and sub.channel.principal.role == Role.CUSTOMER:
                self.customer_orders.pop(sub.channel.principal.user, None)
            elif name.startswith("order:"):
                self.streams.pop(name, None)

    def publish(self, events: list[FeedEvent]) -> None:
        if not events:
            return
        self.window.append(events)
        self.head_hash = events[-1].hash
        if self._waiters:
            head = self.head
            for seq, event in self._waiters:
                if seq <= head:
                    event.set()
            self._waiters = [(seq, event) for seq, event in self._waiters if seq > head]
        visible = [(event, targets) for event in events if (targets := self._targets(event))]
        if len(visible) == 1:  # one event anyone here sees (a new order's stock moves go to `inventory`)
            self._send_one(*visible[0])
        elif visible:
            self._send_many(visible)

    def _targets(self, event: FeedEvent) -> list[Subscription]:
        """The attached subscriptions that may see `event` (in a new list: sending may detach)."""
        if event.is_order:
            targets = list(self.staff_orders)
            if event.customer in self.customer_orders:
                targets.extend(self.customer_orders[event.customer])
            if event.stream in self.streams:
                targets.extend(self.streams[event.stream])
            return targets
        return list(self.inventory)

    def _overflow(self, connection: "Connection", seq: int) -> None:
        """Too much is queued for `connection` now: its own send loop takes over from event `seq`
        (sent to the subscriptions whose prev is `seq` already, to be sent to the others)."""
        for other in list(connection.subs.values()):
            if other.attached:
                self.detach(other, seq if other.prev == seq else seq - 1)
        connection.wake()

    def _send_one(self, event: FeedEvent, targets: list[Subscription]) -> None:
        """One event (the usual commit at moderate rates): each subscriber's frame is written the
        moment it is reached, the first before the last is even looked at, and the frame bytes
        are built once for every subscription that gets the same ones (same channel and prev:
        all staff on `orders`, say)."""
        seq = event.seq
        last_channel, last_prev, last_redact, frame = None, -1, False, b""
        for sub in targets:
            if not sub.attached:
                continue  # detached earlier in this publish
            redact = sub.redact and sub.channel.redacts(event)
            if sub.prev != last_prev or sub.channel_json != last_channel or redact != last_redact:
                last_channel, last_prev, last_redact = sub.channel_json, sub.prev, redact
                frame = event.frame(last_channel, last_prev, redact)
            sub.prev = seq
            connection = sub.connection
            if connection.writer.buffered + len(frame) > HIGH_WATER:
                self._overflow(connection, seq)
            connection.write_frame(frame)

    def _send_many(self, visible: list[tuple[FeedEvent, list[Subscription]]]) -> None:
        """Several events: each connection's frames are gathered and written with one write."""
        out: dict[Connection, list[bytes]] = {}
        sizes: dict[Connection, int] = {}
        for event, targets in visible:
            seq = event.seq
            last_channel, last_prev, last_redact, frame = None, -1, False, b""
            for sub in targets:
                if not sub.attached:
                    continue  # detached earlier in this publish
                redact = sub.redact and sub.channel.redacts(event)
                if sub.prev != last_prev or sub.channel_json != last_channel or redact != last_redact:
                    last_channel, last_prev, last_redact = sub.channel_json, sub.prev, redact
                    frame = event.frame(last_channel, last_prev, redact)
                sub.prev = seq
                connection = sub.connection
                parts = out.get(connection)
                if parts is None:
                    parts = out[connection] = []
                    sizes[connection] = connection.writer.buffered
                parts.append(frame)
                sizes[connection] += len(frame)
                if sizes[connection] > HIGH_WATER:
                    self._overflow(connection, seq)
        for connection, parts in out.items():
            connection.write_frames(parts)
