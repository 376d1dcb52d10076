"""The pet store's rules: commands in, events out; events in, state out.

Theory of operation. ``decide(command, principal, state)`` validates a command by a principal
against the part of the current state it touches and returns the new events, or raises
``Rejected`` carrying the error code of the protocol (docs/protocol.md). ``evolve(state, event)``
folds one stored event into that state. The projections in SQLite are exactly ``evolve`` folded
over the log, so they can always be rebuilt.

Rules of this file: no I/O, no clock, no randomness. Time, ids and the acting user come in
as arguments; the store assigns seq, version, time and hash when it appends.

When a command is wrong in several ways the first error in this order wins (docs/protocol.md
section 2): ``bad_request``, ``forbidden`` (decided from the role alone, before any lookup),
``not_found``, then ``conflict`` / ``invalid_state`` / ``insufficient_stock``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping  # not typing.Mapping: isinstance on it is several times faster
from typing import Any

import attrs



class Role:
    """The roles a token may carry (docs/protocol.md section 1). Plain strings: they go on the wire."""

    CUSTOMER = "customer"  # places orders and acts on its own (the order's `customer`)
    STAFF = "staff"  # runs the store: stock, and every order
    AUDITOR = "auditor"  # reads everything, changes nothing


ROLES = (Role.CUSTOMER, Role.STAFF, Role.AUDITOR)


class Status:
    """The statuses of an order (the flow itself is TRANSITIONS and STATUS_AFTER below)."""

    PLACED = "placed"
    APPROVED = "approved"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


class ErrorCode:
    """The codes of an `error` reply (docs/protocol.md section 2), defined once."""

    BAD_REQUEST = "bad_request"  # malformed: the client's mistake
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"  # the role may never do this
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the id is taken, or expected_version does not match
    INVALID_STATE = "invalid_state"  # not from the order's current status
    INSUFFICIENT_STOCK = "insufficient_stock"
    RATE_LIMITED = "rate_limited"
    RESYNC_REQUIRED = "resync_required"  # the cursor does not belong to this log
    UNAVAILABLE = "unavailable"  # the log cannot be written right now; retry later
    INTERNAL = "internal"  # a bug, logged on the server; the command was not applied


ERROR_CODES = tuple(value for name, value in vars(ErrorCode).items() if name.isupper())
ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")

MAX_ITEMS = 100  # items per order
MAX_ITEM_QUANTITY = 1000  # units per order line
MAX_STOCK_QUANTITY = 1_000_000_000  # units per add_stock, keeps the sums inside SQLite's int64
MAX_TEXT = {"ship_to": 500, "note": 1000, "name": 200, "carrier": 100, "tracking": 100, "reason": 500}

COMMANDS = (
    "add_stock",
    "place_order",
    "update_order",
    "approve_order",
    "ship_order",
    "deliver_order",
    "cancel_order",
)

# Which roles may ever run a command (decided before any lookup: `forbidden`).
ALLOWED_ROLES = {
    "add_stock": {Role.STAFF},
    "place_order": {Role.CUSTOMER, Role.STAFF},
    "update_order": {Role.CUSTOMER, Role.STAFF},
    "approve_order": {Role.STAFF},
    "ship_order": {Role.STAFF},
    "deliver_order": {Role.STAFF},
    "cancel_order": {Role.CUSTOMER, Role.STAFF},
}

# The fields each command's `data` may carry; True marks a required one.
DATA_FIELDS: dict[str, dict[str, bool]] = {
    "add_stock": {"sku": True, "quantity": True, "name": False},
    "place_order": {"items": True, "ship_to": False, "note": False, "customer": False},
    "update_order": {"ship_to": False, "note": False},
    "approve_order": {},
    "ship_order": {"carrier": False, "tracking": False},
    "deliver_order": {},
    "cancel_order": {"reason": False},
}

# The status flow as data: TRANSITIONS[command][role] = statuses the order may be in.
# An order's customer acts on it as Role.CUSTOMER; staff act on any order.
TRANSITIONS: dict[str, dict[str, frozenset[str]]] = {
    "update_order": {Role.CUSTOMER: frozenset({Status.PLACED}), Role.STAFF: frozenset({Status.PLACED, Status.APPROVED})},
    "approve_order": {Role.STAFF: frozenset({Status.PLACED})},
    "ship_order": {Role.STAFF: frozenset({Status.APPROVED})},
    "deliver_order": {Role.STAFF: frozenset({Status.SHIPPED})},
    "cancel_order": {Role.CUSTOMER: frozenset({Status.PLACED}), Role.STAFF: frozenset({Status.PLACED, Status.APPROVED})},
}

# The status an order has after each order event.
STATUS_AFTER = {
    "order-created": Status.PLACED,
    "order-approved": Status.APPROVED,
    "order-shipped": Status.SHIPPED,
    "order-delivered": Status.DELIVERED,
    "order-cancelled": Status.CANCELLED,
}

# The statuses no command can leave: an order in one of them never changes again.
FINAL_STATUSES = frozenset(STATUS_AFTER.values()) - frozenset().union(
    *(statuses for by_role in TRANSITIONS.values() for statuses in by_role.values()))

EVENT_TYPES = (
    "stock-added",
    "order-created",
    "stock-reserved",
    "order-updated",
    "order-approved",
    "order-shipped",
    "stock-shipped",
    "order-delivered",
    "order-cancelled",
    "stock-released",
)


class Rejected(Exception):
    """A command (or request) refused, with its error code (`ErrorCode`, docs/protocol.md section 2).

    Client mistakes (`bad_request`, `forbidden`, `not_found`) and refused but valid commands
    (`conflict`, `invalid_state`, `insufficient_stock`) both travel as this; anything else
    raised while deciding is a bug.
    """

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details) if details else None

    def __repr__(self) -> str:
        return f"Rejected({self.code!r}, {self.message!r}, {self.details!r})"


@attrs.frozen
class Principal:
    """Who is acting: the token's `sub` and `role`."""

    user: str
    role: str = Role.CUSTOMER


@attrs.frozen
class Command:
    """A command as the client sent it (already a well-formed frame, not yet validated)."""

    name: str
    command_id: str
    order_id: str | None = None
    expected_version: int | None = None
    data: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class NewEvent:
    """An event decided but not yet stored: the store gives it seq, version, time and hash."""

    stream: str
    type: str
    data: dict[str, Any]


@attrs.frozen
class Event:
    """A stored event, as in the log (docs/protocol.md section 5)."""

    seq: int
    stream: str
    version: int
    type: str
    at: str
    actor: str
    command_id: str
    data: dict[str, Any]
    hash: str = ""


@attrs.frozen
class Order:
    order_id: str
    customer: str
    status: str
    items: tuple[tuple[str, int], ...]
    ship_to: str | None
    note: str | None
    version: int
    created_at: str
    updated_at: str
    last_seq: int

    def to_json(self) -> dict[str, Any]:
        """The `order` shape of docs/protocol.md section 4."""
        return {
            "order_id": self.order_id,
            "customer": self.customer,
            "status": self.status,
            "items": [{"sku": s, "quantity": q} for s, q in self.items],
            "ship_to": self.ship_to,
            "note": self.note,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_seq": self.last_seq,
        }


@attrs.frozen
class Stock:
    sku: str
    name: str | None
    available: int
    reserved: int
    version: int
    last_seq: int

    def to_json(self) -> dict[str, Any]:
        """The `stock` shape of docs/protocol.md section 4."""
        return {
            "sku": self.sku,
            "name": self.name,
            "available": self.available,
            "reserved": self.reserved,
            "version": self.version,
            "last_seq": self.last_seq,
        }


@attrs.frozen
class State:
    """The slice of the projections a command touches: orders and stock by key.

    An absent key means the stream has no events (version 0).
    """

    orders: Mapping[str, Order] = attrs.field(factory=dict)
    stock: Mapping[str, Stock] = attrs.field(factory=dict)


def order_stream(order_id: str) -> str:
    return f"order:{order_id}"


def sku_stream(sku: str) -> str:
    return f"sku:{sku}"


def stream_of(command: Command) -> str:
    """The command's target stream, whose version `expected_version` and the ack refer to."""
    if command.name == "add_stock":
        return sku_stream(command.data["sku"])
    return order_stream(command.order_id or "")


# -- validation (bad_request) -------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise Rejected(ErrorCode.BAD_REQUEST, f"{what} must be 1..64 characters of [A-Za-z0-9._-]")
    return value


def _check_text(data: Mapping[str, Any], key: str) -> None:
    if key in data:
        value = data[key]
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT[key]:
            raise Rejected(ErrorCode.BAD_REQUEST, f"data.{key} must be a string of 1..{MAX_TEXT[key]} characters")


def _check_quantity(value: Any, what: str, top: int) -> int:
    if not _is_int(value) or not 1 <= value <= top:
        raise Rejected(ErrorCode.BAD_REQUEST, f"{what} must be an integer from 1 to {top}")
    return value


# Per command: the allowed data fields and the required ones (precomputed for validate).
_ALLOWED_KEYS = {name: frozenset(fields) for name, fields in DATA_FIELDS.items()}
_REQUIRED_KEYS = {name: tuple(k for k, required in fields.items() if required) for name, fields in DATA_FIELDS.items()}


def validate(command: Command) -> None:
    """Raise `bad_request` for anything malformed in the command, looking at nothing else."""
    name = command.name
    allowed = _ALLOWED_KEYS.get(name) if type(name) is str else None
    if allowed is None:
        raise Rejected(ErrorCode.BAD_REQUEST, f"unknown command name {name!r}; expected one of {', '.join(COMMANDS)}")
    if command.expected_version is not None and (
        not _is_int(command.expected_version) or command.expected_version < 0
    ):
        raise Rejected(ErrorCode.BAD_REQUEST, "expected_version must be an integer >= 0")
    data = command.data
    if not isinstance(data, Mapping):
        raise Rejected(ErrorCode.BAD_REQUEST, "data must be an object")
    if not allowed.issuperset(data):
        unknown = sorted(set(data) - allowed)
        fields = DATA_FIELDS[name]
        raise Rejected(ErrorCode.BAD_REQUEST, f"{name}: unknown data field {unknown[0]!r} (allowed: {', '.join(fields) or 'no fields'})")
    for key in _REQUIRED_KEYS[name]:
        if key not in data:
            raise Rejected(ErrorCode.BAD_REQUEST, f"{name}: data.{key} is required")
    if name == "add_stock":
        if command.order_id is not None:
            raise Rejected(ErrorCode.BAD_REQUEST, "add_stock takes no order_id")
        _check_id(data["sku"], "data.sku")
        _check_quantity(data["quantity"], "data.quantity", MAX_STOCK_QUANTITY)
        _check_text(data, "name")
        return
    if command.order_id is None:
        raise Rejected(ErrorCode.BAD_REQUEST, f"{name} needs order_id")
    _check_id(command.order_id, "order_id")
    for key in data:  # every field here is allowed; the free texts get their length checked
        if key in MAX_TEXT:
            _check_text(data, key)
    if name == "place_order":
        items = data["items"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
            raise Rejected(ErrorCode.BAD_REQUEST, f"data.items must be a list of 1..{MAX_ITEMS} items")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or len(item) != 2 or "sku" not in item or "quantity" not in item:
                raise Rejected(ErrorCode.BAD_REQUEST, f"data.items[{i}] must be an object with exactly sku and quantity")
            sku, quantity = item["sku"], item["quantity"]
            if type(sku) is not str or not ID_RE.match(sku):
                _check_id(sku, f"data.items[{i}].sku")
            if type(quantity) is not int or not 1 <= quantity <= MAX_ITEM_QUANTITY:
                _check_quantity(quantity, f"data.items[{i}].quantity", MAX_ITEM_QUANTITY)
        if "customer" in data:
            _check_id(data["customer"], "data.customer")
    elif name == "update_order" and "ship_to" not in data and "note" not in data:
        raise Rejected(ErrorCode.BAD_REQUEST, "update_order needs at least one of data.ship_to, data.note")


def authorize(command: Command, principal: Principal) -> None:
    """Raise `forbidden` when the role may never run this command (no lookup involved)."""
    if principal.role not in ALLOWED_ROLES[command.name]:
        raise Rejected(ErrorCode.FORBIDDEN, f"role {principal.role!r} may not {command.name}")
    if command.name == "place_order" and principal.role == Role.CUSTOMER:
        customer = command.data.get("customer")
        if customer is not None and customer != principal.user:
            raise Rejected(ErrorCode.FORBIDDEN, "a customer may place orders only for itself")


# -- decide --------------------------------------------------------------------------------


def can_see_order(principal: Principal, order: Order | None) -> bool:
    """Customers see only their own orders; staff and auditors see all."""
    return order is not None and (principal.role != Role.CUSTOMER or order.customer == principal.user)


def _check_version(command: Command, current: int) -> None:
    if command.expected_version is not None and command.expected_version != current:
        raise Rejected(
            ErrorCode.CONFLICT,
            f"{stream_of(command)} is at version {current}, not {command.expected_version}",
            {"current_version": current},
        )


def _optional(data: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: data[k] for k in keys if k in data}


def decide(command: Command, principal: Principal, state: State) -> list[NewEvent]:
    """Validate `command` by `principal` against `state` and return the events to append.

    Raises `Rejected` with the error code (`ErrorCode`); a rejected command appends nothing.
    """
    validate(command)
    authorize(command, principal)
    data = command.data
    if command.name == "add_stock":
        sku = data["sku"]
        stock = state.stock.get(sku)
        _check_version(command, stock.version if stock else 0)
        return [NewEvent(sku_stream(sku), "stock-added", {"sku": sku, "quantity": data["quantity"], **_optional(data, "name")})]

    order_id = command.order_id
    assert order_id is not None
    order = state.orders.get(order_id)
    stream = order_stream(order_id)

    if command.name == "place_order":
        if order is not None:
            # Order ids are global: any used id is a conflict, whoever owns it. The current
            # version is named only to someone who may see the order.
            details = {"current_version": order.version} if can_see_order(principal, order) else None
            raise Rejected(ErrorCode.CONFLICT, f"order id {order_id!r} is already used", details)
        _check_version(command, 0)
        wanted: dict[str, int] = {}
        for item in data["items"]:
            wanted[item["sku"]] = wanted.get(item["sku"], 0) + item["quantity"]
        for sku, quantity in wanted.items():
            stock = state.stock.get(sku)
            available = stock.available if stock else 0
            if available < quantity:
                raise Rejected(
                    ErrorCode.INSUFFICIENT_STOCK,
                    f"only {available} of {sku!r} available, {quantity} asked",
                    {"sku": sku, "available": available},
                )
        customer = data.get("customer", principal.user)
        items = [{"sku": i["sku"], "quantity": i["quantity"]} for i in data["items"]]
        created = {"customer": customer, "items": items, **_optional(data, "ship_to", "note")}
        return [NewEvent(stream, "order-created", created)] + [
            NewEvent(sku_stream(i["sku"]), "stock-reserved", {"sku": i["sku"], "quantity": i["quantity"], "order_id": order_id})
            for i in items
        ]

    if not can_see_order(principal, order):
        raise Rejected(ErrorCode.NOT_FOUND, f"order {order_id!r} not found")
    assert order is not None
    _check_version(command, order.version)
    allowed = TRANSITIONS[command.name].get(principal.role, frozenset())
    if order.status not in allowed:
        raise Rejected(ErrorCode.INVALID_STATE, f"cannot {command.name} an order that is {order.status}")

    if command.name == "update_order":
        return [NewEvent(stream, "order-updated", _optional(data, "ship_to", "note"))]
    if command.name == "approve_order":
        return [NewEvent(stream, "order-approved", {})]
    if command.name == "deliver_order":
        return [NewEvent(stream, "order-delivered", {})]
    if command.name == "ship_order":
        order_type, per_item, extra = "order-shipped", "stock-shipped", _optional(data, "carrier", "tracking")
    else:  # cancel_order
        order_type, per_item, extra = "order-cancelled", "stock-released", _optional(data, "reason")
    return [NewEvent(stream, order_type, extra)] + [
        NewEvent(sku_stream(sku), per_item, {"sku": sku, "quantity": q, "order_id": order_id})
        for sku, q in order.items
    ]


# -- evolve --------------------------------------------------------------------------------


def evolve_order(order: Order | None, event: Event) -> Order | None:
    """Fold one event of an `order:` stream into that order."""
    data = event.data
    if event.type == "order-created":
        return Order(
            order_id=event.stream.partition(":")[2],
            customer=data["customer"],
            status=Status.PLACED,
            items=tuple((i["sku"], i["quantity"]) for i in data["items"]),
            ship_to=data.get("ship_to"),
            note=data.get("note"),
            version=event.version,
            created_at=event.at,
            updated_at=event.at,
            last_seq=event.seq,
        )
    if order is None:
        raise ValueError(f"seq {event.seq}: {event.type} for an order that was never created")
    status, ship_to, note = order.status, order.ship_to, order.note
    if event.type == "order-updated":
        ship_to = data.get("ship_to", ship_to)
        note = data.get("note", note)
    elif event.type in STATUS_AFTER:
        status = STATUS_AFTER[event.type]
    else:
        raise ValueError(f"seq {event.seq}: unknown order event type {event.type!r}")
    # Built directly rather than with attrs.evolve: this runs once per order event in rebuilds.
    return Order(order.order_id, order.customer, status, order.items, ship_to, note, event.version,
                 order.created_at, event.at, event.seq)


def evolve_stock(stock: Stock | None, event: Event) -> Stock:
    """Fold one event of a `sku:` stream into that stock level."""
    data = event.data
    if stock is None:
        stock = Stock(sku=data["sku"], name=None, available=0, reserved=0, version=0, last_seq=0)
    q = data["quantity"]
    available, reserved, name = stock.available, stock.reserved, stock.name
    if event.type == "stock-added":
        available += q
        name = data.get("name", name)
    elif event.type == "stock-reserved":
        available -= q
        reserved += q
    elif event.type == "stock-shipped":
        reserved -= q
    elif event.type == "stock-released":
        available += q
        reserved -= q
    else:
        raise ValueError(f"seq {event.seq}: unknown stock event type {event.type!r}")
    return Stock(stock.sku, name, available, reserved, event.version, event.seq)


def evolve(state: State, event: Event) -> State:
    """Fold one event into a state (a new State; the old one is unchanged)."""
    kind, _, key = event.stream.partition(":")
    if kind == "order":
        orders = dict(state.orders)
        orders[key] = evolve_order(state.orders.get(key), event)  # type: ignore[assignment]
        return State(orders, state.stock)
    if kind == "sku":
        stock = dict(state.stock)
        stock[key] = evolve_stock(state.stock.get(key), event)
        return State(state.orders, stock)
    raise ValueError(f"seq {event.seq}: unknown stream {event.stream!r}")


def fold(events, state: State | None = None) -> State:
    """`evolve` folded over events, mutating one working copy (for rebuilds of big logs)."""
    orders = dict(state.orders) if state else {}
    stock = dict(state.stock) if state else {}
    for event in events:
        kind, _, key = event.stream.partition(":")
        if kind == "order":
            orders[key] = evolve_order(orders.get(key), event)
        elif kind == "sku":
            stock[key] = evolve_stock(stock.get(key), event)
        else:
            raise ValueError(f"seq {event.seq}: unknown stream {event.stream!r}")
    return State(orders, stock)


def order_of_event(event_stream: str, data: Mapping[str, Any]) -> str | None:
    """The order an event concerns: its own stream's id, or `data.order_id` of stock moves."""
    if event_stream.startswith("order:"):
        return event_stream[6:]
    return data.get("order_id")
