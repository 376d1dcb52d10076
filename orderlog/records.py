"""The records passed between the shell and the store: a command to append (`Request`), its
outcome (`Ack` or a `Rejected`), what a batch appended (`BatchResult`, `EventRow`), and which
events to read (`Filter`). Pure data."""

from __future__ import annotations

from typing import NamedTuple

import attrs

from .domain import Command, Principal, Rejected

# -- requests and outcomes --------------------------------------------------------------------


@attrs.frozen
class Request:
    """One command to append: who sent it, what it is, and when it arrived."""

    principal: Principal
    command: Command
    at: str


@attrs.frozen
class Ack:
    seq: int
    version: int
    events: tuple[str, ...]
    duplicate: bool = False


Outcome = Ack | Rejected


class EventRow(NamedTuple):
    """One appended event as the feed needs it (feed.FEED_COLUMNS, in this order).

    A tuple, so that the store hands the same object to SQLite and to the service. `data` is
    the event's canonical JSON text; `order_id` the order it concerns (None for a stock move
    of no order); `customer` that order's customer (the events column `owner`).
    """

    seq: int
    stream: str
    version: int
    type: str
    at: str
    actor: str
    command_id: str
    data: str
    hash: str
    order_id: str | None
    customer: str | None


@attrs.frozen
class BatchResult:
    """What `Store.execute_batch` did: one outcome per request, in order, and the events it
    appended (in seq order; empty when every command was rejected or a duplicate)."""

    outcomes: list[Outcome]
    appended: list[EventRow] = attrs.Factory(list)


@attrs.frozen
class Filter:
    """Which events to read; every field optional and ANDed (the `query` filter keys)."""

    stream: str | None = None
    order_id: str | None = None
    types: tuple[str, ...] | None = None
    actor: str | None = None
    after: int = 0
    until: int | None = None
    from_time: str | None = None  # stored form, inclusive (see time_bound)
    to_time: str | None = None  # stored form, exclusive


