"""Hypothesis strategies for the domain and the store: random but realistic command traffic.

The pools of principals, skus, order ids and command ids are deliberately small, so that
random commands collide often: orders get placed, approved, shipped and cancelled by several
people, stock runs out, command ids repeat, expected versions sometimes match. A fraction of
the commands is malformed on purpose (quantity 0, unknown data keys, bad ids, a customer
placing an order for another customer) to exercise the rejections.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from hypothesis import strategies as st

from orderlog.domain import Command, Principal
from orderlog.records import Request

CUSTOMERS = ("c-1", "c-2", "c-3")
CUSTOMER_PRINCIPALS = tuple(Principal(c, "customer") for c in CUSTOMERS)
STAFF = Principal("s-1", "staff")
AUDITOR = Principal("a-1", "auditor")
PRINCIPALS = CUSTOMER_PRINCIPALS + (STAFF, AUDITOR)

SKUS = ("sku-a", "sku-b", "sku-c")
ORDER_IDS = ("o-1", "o-2", "o-3", "o-4")
COMMAND_IDS = tuple(f"cmd-{i}" for i in range(25))
BAD_IDS = ("", "has space", "x" * 65, "caf\u00e9", "a/b", 7, None)

ORDER_COMMANDS = ("update_order", "approve_order", "ship_order", "deliver_order", "cancel_order")

# Short printable texts, including some non-ASCII, for ship_to/note/name/carrier/...
texts = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "Zs", "P")),
    min_size=1,
    max_size=12,
)


def format_at(moment: datetime) -> str:
    """An RFC 3339 UTC time with milliseconds and a Z, like "2026-11-25T17:03:00.123Z"."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


ats = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31)).map(format_at)

principals = st.one_of(
    st.sampled_from(CUSTOMER_PRINCIPALS),
    st.sampled_from(CUSTOMER_PRINCIPALS),
    st.just(STAFF),
    st.just(STAFF),
    st.just(STAFF),
    st.just(AUDITOR),
)
command_ids = st.sampled_from(COMMAND_IDS)
skus = st.sampled_from(SKUS)
order_ids = st.sampled_from(ORDER_IDS)
expected_versions = st.one_of(st.none(), st.none(), st.integers(min_value=0, max_value=4))


def _optional_fields(**fields: st.SearchStrategy) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def add_stock_commands(draw) -> Command:
    data = {"sku": draw(skus), "quantity": draw(st.integers(min_value=1, max_value=8))}
    data.update(draw(_optional_fields(name=texts)))
    return Command("add_stock", draw(command_ids), None, draw(expected_versions), data)


@st.composite
def place_order_commands(draw) -> Command:
    items = draw(
        st.lists(
            st.fixed_dictionaries({"sku": skus, "quantity": st.integers(min_value=1, max_value=4)}),
            min_size=1,
            max_size=3,
        )
    )
    data: dict[str, Any] = {"items": items}
    data.update(draw(_optional_fields(ship_to=texts, note=texts, customer=st.sampled_from(CUSTOMERS))))
    return Command("place_order", draw(command_ids), draw(order_ids), draw(expected_versions), data)


@st.composite
def order_commands(draw) -> Command:
    name = draw(st.sampled_from(ORDER_COMMANDS))
    if name == "update_order":
        data = draw(_optional_fields(ship_to=texts, note=texts))  # sometimes empty: bad_request
    elif name == "ship_order":
        data = draw(_optional_fields(carrier=texts, tracking=texts))
    elif name == "cancel_order":
        data = draw(_optional_fields(reason=texts))
    else:
        data = {}
    return Command(name, draw(command_ids), draw(order_ids), draw(expected_versions), data)


valid_commands = st.one_of(add_stock_commands(), place_order_commands(), place_order_commands(), order_commands(),
                           order_commands(), order_commands())


@st.composite
def broken_commands(draw) -> Command:
    """A command that is malformed in one way (mostly `bad_request`)."""
    command = draw(valid_commands)
    data = dict(command.data)
    how = draw(st.sampled_from(("quantity", "unknown_key", "bad_order_id", "bad_sku", "expected_version",
                                "foreign_customer")))
    if how == "quantity" and command.name == "add_stock":
        data["quantity"] = draw(st.sampled_from((0, -1, True, "3", 1.5)))
    elif how == "quantity" and command.name == "place_order":
        items = [dict(i) for i in data["items"]]
        items[0]["quantity"] = draw(st.sampled_from((0, -2, 1001, False, None)))
        data["items"] = items
    elif how == "bad_sku" and command.name == "add_stock":
        data["sku"] = draw(st.sampled_from(BAD_IDS))
    elif how == "bad_sku" and command.name == "place_order":
        data["items"] = [{"sku": draw(st.sampled_from(BAD_IDS)), "quantity": 1}]
    elif how == "bad_order_id" and command.name != "add_stock":
        return Command(command.name, command.command_id, draw(st.sampled_from(BAD_IDS)), command.expected_version, data)
    elif how == "expected_version":
        return Command(command.name, command.command_id, command.order_id,
                       draw(st.sampled_from((-1, True, "1"))), data)
    elif how == "foreign_customer" and command.name == "place_order":
        data["customer"] = draw(st.sampled_from(CUSTOMERS))  # forbidden when a customer names another
    else:
        data[draw(st.sampled_from(("colour", "price", "sku_", "Quantity")))] = 1
    return Command(command.name, command.command_id, command.order_id, command.expected_version, data)


commands = st.one_of(valid_commands, valid_commands, valid_commands, valid_commands, broken_commands())

requests = st.builds(Request, principals, commands, ats)



@st.composite
def restocks(draw) -> list[Request]:
    """Staff restocking most skus first, so that orders can actually be placed."""
    found = []
    for sku in SKUS:
        quantity = draw(st.integers(min_value=0, max_value=30))  # 0: this sku is not restocked
        if quantity:
            command = Command("add_stock", f"restock-{sku}", None, None, {"sku": sku, "quantity": quantity})
            found.append(Request(STAFF, command, draw(ats)))
    return found


@st.composite
def lifecycles(draw) -> list[Request]:
    """One order's plausible life: placed, then some of update/approve/ship/deliver or cancel."""
    order_id = draw(order_ids)
    owner = draw(st.sampled_from(CUSTOMER_PRINCIPALS))
    by_staff = draw(st.booleans())
    place = draw(place_order_commands())
    data = dict(place.data)
    if by_staff:
        data["customer"] = owner.user
    else:
        data.pop("customer", None)
    steps = [(STAFF if by_staff else owner, Command("place_order", place.command_id, order_id, None, data))]
    flow = ["approve_order", "ship_order", "deliver_order"]
    length = draw(st.integers(min_value=0, max_value=len(flow)))
    for name in flow[:length]:
        if draw(st.integers(min_value=0, max_value=4)) == 0:
            steps.append((draw(st.sampled_from((owner, STAFF))),
                          Command("update_order", draw(command_ids), order_id, None, {"note": draw(texts)})))
        steps.append((STAFF, Command(name, draw(command_ids), order_id, None, {})))
    if draw(st.booleans()):
        steps.append((draw(st.sampled_from((owner, STAFF))),
                      Command("cancel_order", draw(command_ids), order_id, None, draw(_optional_fields(reason=texts)))))
    return [Request(p, c, draw(ats)) for p, c in steps]


@st.composite
def interleavings(draw, parts: list[list[Request]]) -> list[Request]:
    """Merge lists into one, keeping each list's own order."""
    parts = [list(p) for p in parts if p]
    merged: list[Request] = []
    while parts:
        i = draw(st.integers(min_value=0, max_value=len(parts) - 1))
        merged.append(parts[i].pop(0))
        if not parts[i]:
            parts.pop(i)
    return merged


@st.composite
def request_sequences(draw, max_size: int = 25) -> list[Request]:
    """Random traffic: a few restocks, then order lifecycles interleaved with random requests."""
    stories = draw(st.lists(lifecycles(), max_size=3))
    noise = draw(st.lists(requests, max_size=max_size))
    return draw(restocks()) + draw(interleavings([*stories, noise]))


@st.composite
def batch_splits(draw, sequence: list[Request]) -> list[list[Request]]:
    """Split a sequence into consecutive non-empty batches at random points."""
    if not sequence:
        return []
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=max(1, len(sequence) - 1)),
                               max_size=len(sequence))))
    cuts = [c for c in cuts if 0 < c < len(sequence)]
    bounds = [0, *cuts, len(sequence)]
    return [sequence[a:b] for a, b in zip(bounds, bounds[1:])]


@st.composite
def batched_sequences(draw) -> list[list[Request]]:
    """Random traffic split into random group-commit batches."""
    return draw(batch_splits(draw(request_sequences())))
