"""The live feed's data side: events encoded once, a bounded window of recent ones, and
the per-channel visibility rules (PROTOCOL.md section 3).

A subscription is a cursor on the log. It reads what follows its cursor from the in-memory
window when the window still holds it, and from SQLite otherwise; so a slow subscriber costs
a cursor, not a queue, and live delivery costs no query per subscriber.

Pure except for `read_feed`, which runs a blocking SQLite query (call it from a thread).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Iterable, Sequence

import attrs

from .domain import Principal
from .store import dumps

DEFAULT_WINDOW = 20_000  # recent events kept in memory for live delivery


@attrs.define(slots=True)
class FeedEvent:
    """A committed event, encoded once for every subscriber.

    `tail` is the frame after `prev` (`"stream":...,"hash":"..."}`); `redacted_tail` is the
    same with `data.order_id` left out, for customers reading `inventory` moves of orders
    that are not theirs (see README: to a customer, another customer's order does not exist).
    """

    seq: int
    stream: str
    type: str
    owner: str | None
    order_id: str | None
    tail: str
    redacted_tail: str | None

    def frame(self, channel_json: str, prev: int, redact: bool) -> str:
        tail = self.redacted_tail if redact and self.redacted_tail is not None else self.tail
        return f'{{"type":"{self.type}","channel":{channel_json},"seq":{self.seq},"prev":{prev},{tail}'


FEED_COLUMNS = "seq, stream, version, type, at, actor, command_id, data, hash, order_id, owner"


def _tail(stream: str, version: int, at: str, actor: str, command_id: str, data_json: str, hash_: str) -> str:
    enc = json.dumps
    return (
        f'"stream":{enc(stream, ensure_ascii=False)},"version":{version},"at":{enc(at)},'
        f'"actor":{enc(actor, ensure_ascii=False)},"command_id":{enc(command_id, ensure_ascii=False)},'
        f'"data":{data_json},"hash":"{hash_}"}}'
    )


def feed_event(row: Sequence[Any]) -> FeedEvent:
    """A FeedEvent from an events row (FEED_COLUMNS order)."""
    seq, stream, version, type_, at, actor, command_id, data, hash_, order_id, owner = row
    redacted = None
    if order_id is not None and stream.startswith("sku:"):
        data_value = json.loads(data)
        data_value.pop("order_id", None)
        redacted = _tail(stream, version, at, actor, command_id, dumps(data_value), hash_)
    return FeedEvent(seq, stream, type_, owner, order_id, _tail(stream, version, at, actor, command_id, data, hash_),
                     redacted)


@attrs.frozen
class Channel:
    """What a subscription may see: a channel name seen by one principal."""

    name: str
    principal: Principal

    @property
    def json_name(self) -> str:
        return json.dumps(self.name)

    def sees(self, event: FeedEvent) -> bool:
        if self.name == "orders":
            return event.stream.startswith("order:") and (
                self.principal.role != "customer" or event.owner == self.principal.user
            )
        if self.name == "inventory":
            return event.stream.startswith("sku:")
        return event.stream == self.name

    def redacts(self, event: FeedEvent) -> bool:
        """Whether this subscriber gets the event without `data.order_id`."""
        return self.principal.role == "customer" and event.owner != self.principal.user

    def sql(self) -> tuple[str, list[Any]]:
        """The WHERE clause (beyond the seq range) selecting this channel's visible events."""
        if self.name == "orders":
            if self.principal.role == "customer":
                return "owner = ? AND substr(stream, 1, 6) = 'order:'", [self.principal.user]
            return "substr(stream, 1, 6) = 'order:'", []
        if self.name == "inventory":
            return "substr(stream, 1, 4) = 'sku:'", []
        return "stream = ?", [self.name]


def read_feed(conn: sqlite3.Connection, channel: Channel | None, after: int, until: int, limit: int) -> list[FeedEvent]:
    """Committed events with after < seq <= until that `channel` sees (all if None), in order."""
    where, params = channel.sql() if channel is not None else ("1", [])
    rows = conn.execute(
        f"SELECT {FEED_COLUMNS} FROM events WHERE seq > ? AND seq <= ? AND {where} ORDER BY seq LIMIT ?",
        [after, until, *params, limit],
    )
    return [feed_event(r) for r in rows]


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
