"""The records passed between the shell and the store: a command to append (`Request`), its
outcome (`Ack` or a `Rejected`), and which events to read (`Filter`). Pure data."""

from __future__ import annotations

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


