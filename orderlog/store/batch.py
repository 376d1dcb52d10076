"""The batch decision: a batch of requests in, one outcome each and the rows to append out.

No SQL here: the store loads the state and the stored acks, calls `decide_batch`, and writes
the `BatchRows` it returns in the same transaction. Each request goes through named steps:

1. `dedupe`: a command already answered (earlier in this batch, or stored) gets its first ack
   back, marked duplicate, and appends nothing.
2. `decide_command`: `domain.decide` against the state including the effects of the batch's
   earlier commands; a rejection (or a crash, which is logged) fails that command alone.
3. `append_events`: number each new event (seq, stream version), hash it into the chain, and
   evolve the order or stock level it belongs to.
"""

from __future__ import annotations

import logging
from hashlib import sha256 as _sha256
from typing import Callable, Mapping, Sequence

import attrs

from ..canonical import dumps, dumps_validated, event_hash, json_string
from ..domain import (
    EVENT_TYPES,
    ErrorCode,
    Event,
    NewEvent,
    Order,
    Rejected,
    State,
    Stock,
    decide,
    evolve_order,
    evolve_stock,
    order_of_event,
    stream_of,
)
from ..records import Ack, EventRow, Outcome, Request

log = logging.getLogger("orderlog")

CommandKey = tuple[str, str]  # (actor, command id): what makes a command unique
_new_row = tuple.__new__  # EventRow(...) without NamedTuple's keyword handling (the hot path)


@attrs.frozen
class LastEvent:
    """The log's newest event as the chain needs it: its seq (the head) and its hash."""

    seq: int
    hash: bytes


@attrs.frozen
class StoredAcks:
    """The stored acks of a batch's command keys: found in bulk, or looked up one by one for the
    keys of a type the bulk lookup does not bind."""

    found: Mapping[CommandKey, Ack]
    unusual: frozenset = frozenset()
    lookup: Callable[[CommandKey], Ack | None] = lambda key: None

    def get(self, key: CommandKey) -> Ack | None:
        return self.lookup(key) if key in self.unusual else self.found.get(key)


@attrs.define
class BatchRows:
    """The rows a batch appends: events (EventRow), commands, and the projections it changed."""

    events: list[EventRow] = attrs.Factory(list)
    commands: list[tuple] = attrs.Factory(list)  # (actor, command_id, seq, version, events JSON)
    orders: dict[str, Order] = attrs.Factory(dict)
    created: set[str] = attrs.Factory(set)  # ids of the orders created in the batch
    stock: dict[str, Stock] = attrs.Factory(dict)
    last_seq: int = 0


@attrs.frozen
class Decision:
    """The outcome of each request, in order, and the rows to write."""

    outcomes: list[Outcome]
    rows: BatchRows


@attrs.frozen
class Appended:
    """One command's new events, numbered, hashed and evolved."""

    rows: list[EventRow]
    orders: dict[str, Order]  # the orders it changed, as they are after it
    stock: dict[str, Stock]  # the same for stock levels
    created: set[str]  # ids of the orders it created
    types: tuple[str, ...]
    last: LastEvent


def decide_batch(requests: Sequence[Request], state: State, last: LastEvent, stored: StoredAcks) -> Decision:
    """Decide `requests` in order against `state` after the log's newest event `last`.

    `state` (the orders and stock levels the batch may touch) is updated in place with the
    effects of each applied command, so that the next one sees them.
    """
    orders, stock = state.orders, state.stock
    seen: dict[CommandKey, Ack] = {}
    rows = BatchRows()
    outcomes: list[Outcome] = []
    for request in requests:
        key = (request.principal.user, request.command.command_id)
        earlier = dedupe(key, seen, stored)
        if earlier is not None:
            outcomes.append(earlier)
            continue
        decided = decide_command(request, state)
        if isinstance(decided, Rejected):
            outcomes.append(decided)
            continue
        appended = append_events(request, decided, state, last)
        last = appended.last
        orders.update(appended.orders)  # type: ignore[attr-defined]
        stock.update(appended.stock)  # type: ignore[attr-defined]
        target = stream_of(request.command)
        target_version = (orders[target[6:]] if target.startswith("order:") else stock[target[4:]]).version
        ack = Ack(last.seq, target_version, appended.types)
        seen[key] = ack
        outcomes.append(ack)
        rows.events.extend(appended.rows)
        rows.commands.append((key[0], key[1], last.seq, target_version, event_types_text(appended.types)))
        rows.orders.update(appended.orders)
        rows.stock.update(appended.stock)
        rows.created.update(appended.created)
        rows.last_seq = last.seq
    return Decision(outcomes, rows)


def dedupe(key: CommandKey, seen: Mapping[CommandKey, Ack], stored: StoredAcks) -> Ack | None:
    """The first ack of a command already answered, marked duplicate; None for a new command."""
    earlier = seen.get(key) or stored.get(key)
    return attrs.evolve(earlier, duplicate=True) if earlier is not None else None


def decide_command(request: Request, state: State) -> list[NewEvent] | Rejected:
    """`domain.decide` for one request: its new events, or why it was refused."""
    try:
        return decide(request.command, request.principal, state)
    except Rejected as rejection:
        # Kept without its traceback: that would hold this frame, whose caller's `outcomes`
        # holds the rejection, a cycle that keeps the whole batch alive until the garbage
        # collector finds it.
        rejection.__traceback__ = None
        return rejection
    except Exception:
        # A bug, not the client's fault: this command fails alone, its neighbours go on.
        log.exception("event=decide.crashed actor=%r command=%r", request.principal.user, request.command.name)
        return Rejected(ErrorCode.INTERNAL, "internal error; the command was not applied")


def append_events(request: Request, new_events: Sequence[NewEvent], state: State, last: LastEvent) -> Appended:
    """Number, hash and evolve one command's new events, after the log's newest event `last`."""
    orders, stock = state.orders, state.stock
    at, actor, command_id = request.at, request.principal.user, request.command.command_id
    prefix = canonical_prefix(at, actor, command_id)
    seq, prev_hash = last.seq, last.hash
    touched_orders: dict[str, Order] = {}
    touched_stock: dict[str, Stock] = {}
    created: set[str] = set()
    types: list[str] = []
    rows: list[EventRow] = []
    for new in new_events:
        stream, type_, data = new.stream, new.type, new.data
        # number: the next seq of the log, the next version of the stream
        is_order = stream.startswith("order:")
        if is_order:
            key = stream[6:]
            current = touched_orders.get(key) or orders.get(key)
        else:
            key = stream[4:]
            current = touched_stock.get(key) or stock.get(key)
        seq += 1
        version = (current.version if current else 0) + 1
        # hash: into the chain
        data_text = dumps_validated(data)
        prev_hash = hash_event(prefix, prev_hash, seq, stream, version, type_, data, data_text, (at, actor, command_id))
        event = Event(seq, stream, version, type_, at, actor, command_id, data, prev_hash.hex())
        # evolve: the order or stock level it belongs to
        if is_order:
            if current is None:
                created.add(key)
            touched_orders[key] = evolve_order(current, event)  # type: ignore[assignment,arg-type]
        else:
            touched_stock[key] = evolve_stock(current, event)  # type: ignore[arg-type]
        order_id = order_of_event(stream, data)
        found = (touched_orders.get(order_id) or orders.get(order_id)) if order_id is not None else None
        customer = found.customer if found is not None else None
        types.append(type_)
        rows.append(_new_row(EventRow, (seq, stream, version, type_, at, actor, command_id, data_text, event.hash,
                                        order_id, customer)))
    return Appended(rows, touched_orders, touched_stock, created, tuple(types), LastEvent(seq, prev_hash))


def canonical_prefix(at: str, actor: str, command_id: str) -> str | None:
    """The start of canonical(event) shared by a command's events (keys in sorted order, up to
    `"data":`), or None when a field is not a plain str and `event_hash`'s general path must run."""
    if type(at) is str and type(actor) is str and type(command_id) is str:
        return ('{"actor":' + json_string(actor) + ',"at":' + json_string(at) + ',"command_id":'
                + json_string(command_id) + ',"data":')
    return None


def hash_event(prefix: str | None, prev_hash: bytes, seq: int, stream: str, version: int, type_: str,
               data: Mapping, data_text: str, origin: tuple[str, str, str]) -> bytes:
    """`sha256(prev_hash + canonical(event))` of the event with these fields, as bytes (the next
    event's `prev_hash`); `origin` is (at, actor, command_id), `data_text` the data's JSON.

    canonical(event) without a second encoding of the data when `prefix` is known and the
    stream and type are plain str; anything else takes `event_hash`'s general path.
    """
    if prefix is not None and type(stream) is str and type(type_) is str:
        canonical = (prefix + data_text + ',"seq":' + str(seq) + ',"stream":' + json_string(stream)
                     + ',"type":' + json_string(type_) + ',"version":' + str(version) + "}").encode()
        return _sha256(prev_hash + canonical).digest()
    at, actor, command_id = origin
    return bytes.fromhex(event_hash(prev_hash, Event(seq, stream, version, type_, at, actor, command_id, data)))  # type: ignore[arg-type]


_PLAIN_TYPES = frozenset(t for t in EVENT_TYPES if t.replace("-", "").isalnum() and t.isascii())
_TYPES_TEXT: dict[tuple[str, ...], str] = {}  # memo of event_types_text (few distinct lists of known types)


def event_types_text(types: Sequence[str]) -> str:
    """`dumps(list(types))` for the commands table; the known types need no escaping."""
    key = tuple(types)
    text = _TYPES_TEXT.get(key)
    if text is not None:
        return text
    if all(t in _PLAIN_TYPES for t in types):
        text = '["' + '","'.join(types) + '"]'
        if len(_TYPES_TEXT) < 1000:
            _TYPES_TEXT[key] = text
        return text
    return dumps(list(types))
