"""The live feed's data side: events encoded once, a bounded window of recent ones, and
the per-channel visibility rules (docs/protocol.md section 3).

A subscription is a cursor on the log. It reads what follows its cursor from the in-memory
window when the window still holds it, and from SQLite otherwise; so a slow subscriber costs
a cursor, not a queue, and live delivery costs no query per subscriber.

Pure: the SQL that reads the feed from the log lives in `orderlog.store.feedreads`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Sequence

import attrs

from .domain import Principal, Role
from .wire import frame_header

# The parts of a stock move's tail that identify its order's customer or let a guess be tested:
# actor and command_id (JSON strings), data's order_id (first, as data is canonical JSON with
# sorted keys), and the hash. The tail's shape is fixed by `_tail` (and SQLite's twin).
_REDACTED_PARTS = re.compile(
    rb'(,"actor":)"(?:[^"\\]|\\.)*"(,"command_id":)"(?:[^"\\]|\\.)*"(,"data":\{)"order_id":"[A-Za-z0-9._-]*",'
    rb'(.*,"hash":)"[0-9a-f]{64}"\}\Z', re.DOTALL)
_REDACTED_FORM = rb'\1null\2null\3\4null,"redacted":true}'
_string = json.encoder.encode_basestring  # JSON string literal, non-ASCII kept as is (C speed)

DEFAULT_WINDOW = 10_000  # recent events kept in memory for live delivery (up to twice that before a trim)


class FeedEvent:
    """A committed event, encoded once for every subscriber.

    A subscription frame is `pre + channel + mid + prev + tail` (`prev` is the only part that
    differs between two subscribers of one channel), framed as a WebSocket text frame.
    `redacted_tail` is the tail for customers reading stock moves of orders that are not theirs:
    to a customer, another customer's order does not exist, so nothing in the frame may identify
    that customer or let a guess be tested (`redact_tail`).
    """

    __slots__ = ("seq", "stream", "type", "customer", "order_id", "is_order", "pre", "mid", "tail", "hash", "_redacted")

    def __init__(self, seq: int, stream: str, type_: str, customer: str | None, order_id: str | None,
                 is_order: bool, pre: bytes, mid: bytes, tail: bytes, hash_: str):
        self.seq = seq
        self.stream = stream
        self.type = type_
        self.customer = customer  # of the order the event concerns (None if none)
        self.order_id = order_id
        self.is_order = is_order
        self.pre = pre  # b'{"type":"<type>","channel":'
        self.mid = mid  # b',"seq":<seq>,"prev":'
        self.tail = tail  # b',"stream":...,"hash":"..."}'
        self.hash = hash_  # the event's hash (also in `tail`): the hub's head_hash
        self._redacted: bytes | None = None

    @property
    def redacted_tail(self) -> bytes:
        """The tail as a customer gets another customer's stock move (docs/protocol.md section 4,
        "Redacted events"): actor, command_id and hash null, no data.order_id, `"redacted":true`.
        Computed when a customer first needs it, then kept with the event (one per event, however
        many customers read it)."""
        if self._redacted is None:
            self._redacted = redact_tail(self.tail)
        return self._redacted

    def payload(self, channel_json: bytes, prev: int, redact: bool = False) -> bytes:
        """The frame's JSON text (UTF-8) for one subscription."""
        return b"".join((self.pre, channel_json, self.mid, str(prev).encode(),
                         self.redacted_tail if redact else self.tail))

    def frame(self, channel_json: bytes, prev: int, redact: bool = False) -> bytes:
        """The whole WebSocket text frame for one subscription."""
        prev_bytes = str(prev).encode()
        tail = self.redacted_tail if redact else self.tail
        length = len(self.pre) + len(channel_json) + len(self.mid) + len(prev_bytes) + len(tail)
        return b"".join((frame_header(length), self.pre, channel_json, self.mid, prev_bytes, tail))


def redact_tail(tail: bytes) -> bytes:
    """A stock move's tail with actor, command_id and hash null, data.order_id left out and
    `"redacted":true` added; the bytes `redact_tail_slowly` gives, without decoding the JSON
    (tests/test_feed_encoding.py pins the two together)."""
    redacted, count = _REDACTED_PARTS.subn(_REDACTED_FORM, tail, count=1)
    return redacted if count else redact_tail_slowly(tail)


def redact_tail_slowly(tail: bytes) -> bytes:
    """`redact_tail` by decoding and re-encoding the JSON: the plain twin of the fast path."""
    body = json.loads(b"{" + tail[1:])
    body["actor"] = body["command_id"] = body["hash"] = None
    body["data"].pop("order_id", None)
    body["redacted"] = True
    return b"," + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()[1:]


# The events columns a FeedEvent is made of, in the order of records.EventRow's fields (the
# `owner` column holds the customer of the order the event concerns).
FEED_COLUMNS = "seq, stream, version, type, at, actor, command_id, data, hash, order_id, owner"


def _tail(stream: str, version: int, at: str, actor: str, command_id: str, data_json: str, hash_: str) -> bytes:
    return (
        f',"stream":"{stream}","version":{version},"at":"{at}","actor":{_string(actor)},'
        f'"command_id":{_string(command_id)},"data":{data_json},"hash":"{hash_}"}}'
    ).encode()


def feed_event(row: Sequence[Any]) -> FeedEvent:
    """A FeedEvent from an `EventRow`, or an events row read in FEED_COLUMNS order."""
    seq, stream, version, type_, at, actor, command_id, data, hash_, order_id, customer = row
    # stream, type, at and hash are made of [A-Za-z0-9._:-] only (ids are checked on the way in),
    # so they need no escaping; actor and command_id are any strings.
    tail = _tail(stream, version, at, actor, command_id, data, hash_)
    return FeedEvent(seq, stream, type_, customer, order_id, stream.startswith("order:"),
                     b'{"type":"' + type_.encode() + b'","channel":', b',"seq":' + str(seq).encode() + b',"prev":', tail, hash_)


@attrs.frozen
class Channel:
    """What a subscription may see: a channel name seen by one principal."""

    name: str
    principal: Principal

    @property
    def json_name(self) -> bytes:
        return json.dumps(self.name).encode()

    def sees(self, event: FeedEvent) -> bool:
        if self.name == "orders":
            return event.is_order and (self.principal.role != Role.CUSTOMER or event.customer == self.principal.user)
        if self.name == "inventory":
            return not event.is_order
        return event.stream == self.name

    @property
    def may_redact(self) -> bool:
        """Whether some event of this channel may reach this subscriber redacted (a customer's
        own `orders` never are)."""
        return self.principal.role == Role.CUSTOMER and self.name != "orders"

    def redacts(self, event: FeedEvent) -> bool:
        """Whether this subscriber gets the event redacted (a stock move of another customer's order)."""
        return (self.principal.role == Role.CUSTOMER and event.order_id is not None
                and event.customer != self.principal.user)


# Why a resume is refused with `resync_required` (its `details.reason`): the client's history is
# not a prefix of this log (another log, or this one lost its tail to a restore or a failover).
RESYNC_LOG_ID = "log_id"  # the request's log_id is another log's
RESYNC_SINCE_BEYOND_HEAD = "since_beyond_head"
RESYNC_ANCHOR_BEYOND_HEAD = "anchor_beyond_head"
RESYNC_ANCHOR_MISMATCH = "anchor_mismatch"  # this log's event anchor.seq has another hash
_START_OVER = ": drop your state and start over from since 0"
RESYNC_MESSAGES = {  # str.format()ted with since, head and seq (the anchor's)
    RESYNC_LOG_ID: "log_id is not this log's" + _START_OVER,
    RESYNC_SINCE_BEYOND_HEAD: "since {since} is beyond the head {head}: this log is not the one you read" + _START_OVER,
    RESYNC_ANCHOR_BEYOND_HEAD: "anchor.seq {seq} is beyond the head {head}: this log lost the events you hold "
                               "(a restored backup or a failover)" + _START_OVER,
    RESYNC_ANCHOR_MISMATCH: "event {seq} of this log is not the one you hold: its history differs from yours "
                            "(a restored backup or a failover)" + _START_OVER,
}


def hash_sent(event: FeedEvent, principal: Principal) -> str | None:
    """The `hash` that `principal` receives with `event` on its feeds, or None when none of its
    feeds carries it (not the principal's to see, or sent redacted without it).

    Read from the encoded frame itself, so that an anchor can only name a hash the feed gave
    out: comparing with any other would let a customer test guesses about a redacted event.
    """
    channel = Channel("orders" if event.is_order else "inventory", principal)
    if not channel.sees(event):
        return None
    redact = channel.may_redact and channel.redacts(event)
    return json.loads(event.payload(channel.json_name, 0, redact)).get("hash")


def resume_refusal(principal: Principal, log_id: str, head: int, asked_log_id: str | None, since: int | None,
                   anchor: tuple[int, str] | None, anchored: FeedEvent | None) -> str | None:
    """Why a `subscribe` must be answered `resync_required` (a RESYNC_* reason), or None.

    `anchor` is the request's (seq, hash); `anchored` this log's event at that seq (None when
    beyond the head). A history that is not a prefix of this log is never replayed onto.
    """
    if asked_log_id is not None and asked_log_id != log_id:
        return RESYNC_LOG_ID
    if anchor is not None:  # before `since`, so that the reason names what the client holds
        seq, hash_ = anchor
        if seq > head:
            return RESYNC_ANCHOR_BEYOND_HEAD
        if anchored is None or anchored.seq != seq or hash_sent(anchored, principal) != hash_:
            return RESYNC_ANCHOR_MISMATCH
    if since is not None and since > head:
        return RESYNC_SINCE_BEYOND_HEAD
    return None


def channel_frames(channel: Channel, events: Iterable[FeedEvent], prev: int) -> tuple[list[bytes], int]:
    """The frames `channel` gets of `events` (those it sees, redacted where it must), the first
    one's `prev` being `prev`; and the last one's seq (`prev` if none)."""
    name, redact = channel.json_name, channel.may_redact
    frames = []
    for event in events:
        if channel.sees(event):
            frames.append(event.frame(name, prev, redact and channel.redacts(event)))
            prev = event.seq
    return frames, prev


class Window:
    """The most recent committed events, contiguous in seq, at most about `size` of them."""

    def __init__(self, head: int, size: int = DEFAULT_WINDOW):
        self.size = size
        self.head = head
        self._events: list[FeedEvent] = []
        self._first = head + 1  # seq of _events[0]

    def append(self, events: Iterable[FeedEvent]) -> None:
        for event in events:
            if event.seq != self.head + 1:
                raise ValueError(f"window: seq {event.seq} does not follow head {self.head}")
            self._events.append(event)
            self.head = event.seq
        if len(self._events) > 2 * self.size:
            drop = len(self._events) - self.size
            del self._events[:drop]
            self._first += drop

    def covers(self, after: int) -> bool:
        """Whether every event after `after` (up to the head) is in the window."""
        return after + 1 >= self._first

    def after(self, after: int, limit: int) -> list[FeedEvent]:
        """Up to `limit` events with seq > after; the caller checked `covers(after)`."""
        start = after + 1 - self._first
        return self._events[start : start + limit]

    def __len__(self) -> int:
        return len(self._events)
