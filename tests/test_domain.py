"""The pure domain (docs/protocol.md section 4): role rules, error precedence, the status flow,
stock, the events each command appends and the shapes of orders and stock.

Everything here runs `decide` and `evolve` directly; a tiny in-memory log assigns seq and
version the way the store does.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orderlog.domain import (ERROR_CODES, ROLES, Command, Event, Order, Principal, Rejected, State, Status, Stock,
                             decide, evolve, fold)

from strategies import AUDITOR, CUSTOMERS, STAFF, request_sequences

C1 = Principal("c-1", "customer")
C2 = Principal("c-2", "customer")
AT = "2026-11-25T17:03:00.123Z"
LATER = "2026-11-26T09:30:00.000Z"

ALL_COMMANDS = ("add_stock", "place_order", "update_order", "approve_order", "ship_order", "deliver_order",
                "cancel_order")
ORDER_COMMANDS = ("update_order", "approve_order", "ship_order", "deliver_order", "cancel_order")
STAFF_ONLY = ("add_stock", "approve_order", "ship_order", "deliver_order")
STATUSES = ("placed", "approved", "shipped", "delivered", "cancelled")

# docs/protocol.md section 4, written out independently of domain.TRANSITIONS:
# (command, who) -> the statuses the order may be in.
ALLOWED_FROM = {
    ("update_order", "owner"): {"placed"},
    ("update_order", "staff"): {"placed", "approved"},  # "staff before shipped"
    ("approve_order", "staff"): {"placed"},
    ("ship_order", "staff"): {"approved"},
    ("deliver_order", "staff"): {"shipped"},
    ("cancel_order", "owner"): {"placed"},
    ("cancel_order", "staff"): {"placed", "approved"},
}
STATUS_AFTER = {"approve_order": "approved", "ship_order": "shipped", "deliver_order": "delivered",
                "cancel_order": "cancelled"}

_ids = itertools.count(1)


def cmd(command_name: str, order_id: str | None = None, /, *, expected_version: int | None = None,
        command_id: str | None = None, **data: Any) -> Command:
    """A command with a fresh command id; keyword arguments other than the two named become `data`."""
    return Command(command_name, command_id or f"k-{next(_ids)}", order_id, expected_version, data)


def items(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"sku": s, "quantity": q} for s, q in pairs]


def valid_command(name: str, order_id: str = "o-1") -> Command:
    """A well-formed command of each name (data valid for anyone)."""
    if name == "add_stock":
        return cmd("add_stock", sku="sku-a", quantity=1)
    if name == "place_order":
        return cmd("place_order", order_id, items=items(("sku-a", 1)))
    if name == "update_order":
        return cmd("update_order", order_id, note="leave at the door")
    return cmd(name, order_id)


class Log:
    """An in-memory log: decide, then number the events as the store would and fold them."""

    def __init__(self) -> None:
        self.state = State()
        self.events: list[Event] = []
        self.versions: dict[str, int] = {}

    def run(self, principal: Principal, command: Command, at: str = AT) -> list[Event]:
        appended = []
        for new in decide(command, principal, self.state):
            self.versions[new.stream] = self.versions.get(new.stream, 0) + 1
            event = Event(len(self.events) + 1, new.stream, self.versions[new.stream], new.type, at,
                          principal.user, command.command_id, new.data)
            self.state = evolve(self.state, event)
            self.events.append(event)
            appended.append(event)
        return appended

    def reject(self, principal: Principal, command: Command) -> Rejected:
        before = self.state
        with pytest.raises(Rejected) as info:
            decide(command, principal, self.state)
        assert self.state == before
        return info.value

    def code(self, principal: Principal, command: Command) -> str:
        return self.reject(principal, command).code

    def order(self, order_id: str = "o-1") -> Order:
        return self.state.orders[order_id]

    def stock(self, sku: str) -> Stock:
        return self.state.stock[sku]


def stocked(**levels: int) -> Log:
    """A log where staff added the given quantity of each sku (sku_a=5 -> "sku-a")."""
    log = Log()
    for key, quantity in levels.items():
        log.run(STAFF, cmd("add_stock", sku=key.replace("_", "-"), quantity=quantity))
    return log


def order_in(status: str, owner: Principal = C1, via_approved: bool = False) -> Log:
    """A log with order o-1 of `owner` (2 x sku-a, 1 x sku-b) brought to `status` by staff."""
    log = stocked(sku_a=10, sku_b=10)
    log.run(owner, cmd("place_order", "o-1", items=items(("sku-a", 2), ("sku-b", 1))))
    path = {
        "placed": [],
        "approved": ["approve_order"],
        "shipped": ["approve_order", "ship_order"],
        "delivered": ["approve_order", "ship_order", "deliver_order"],
        "cancelled": (["approve_order"] if via_approved else []) + ["cancel_order"],
    }[status]
    for name in path:
        log.run(STAFF, cmd(name, "o-1"))
    assert log.order().status == status
    return log


def rejection_view(r: Rejected) -> tuple:
    return (r.code, r.message, r.details)


# -- roles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_auditors_may_send_no_command(name):
    """An auditor is `forbidden` for every command, whether or not its target exists."""
    for log in (order_in("placed", owner=Principal("a-1", "customer")), Log()):
        assert log.code(AUDITOR, valid_command(name)) == "forbidden"
        assert log.code(AUDITOR, valid_command(name, "o-unused")) == "forbidden"


@pytest.mark.parametrize("name", STAFF_ONLY)
def test_customers_may_not_run_staff_commands(name):
    """A customer is `forbidden` from add_stock/approve/ship/deliver, even on its own order in the right status."""
    for status in ("placed", "approved", "shipped"):
        log = order_in(status)
        assert log.code(C1, valid_command(name)) == "forbidden"
        assert log.code(C1, valid_command(name, "o-unused")) == "forbidden"


def test_customer_placing_for_another_customer_is_forbidden():
    """A customer sending data.customer other than itself is `forbidden`; naming itself is fine."""
    log = stocked(sku_a=5)
    rejection = log.reject(C1, cmd("place_order", "o-1", items=items(("sku-a", 1)), customer="c-2"))
    assert rejection.code == "forbidden"
    assert "o-1" not in log.state.orders
    [created, _] = log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 1)), customer="c-1"))
    assert created.data["customer"] == "c-1"
    assert log.order().customer == "c-1"


def test_staff_may_place_an_order_on_a_customers_behalf():
    """Staff placing with data.customer makes that customer the owner, who may then update and cancel it."""
    log = stocked(sku_a=5)
    [created, _] = log.run(STAFF, cmd("place_order", "o-1", items=items(("sku-a", 2)), customer="c-1"))
    assert created.actor == "s-1"
    assert created.data == {"customer": "c-1", "items": items(("sku-a", 2))}
    assert log.order().customer == "c-1"
    log.run(C1, cmd("update_order", "o-1", note="thanks"))
    assert log.code(C2, cmd("update_order", "o-1", note="mine?")) == "not_found"
    log.run(C1, cmd("cancel_order", "o-1"))
    assert log.order().status == "cancelled"


def test_staff_placing_without_customer_owns_the_order():
    """Without data.customer the placing user (staff or customer) is the order's customer."""
    log = stocked(sku_a=5)
    log.run(STAFF, cmd("place_order", "o-1", items=items(("sku-a", 1))))
    log.run(C2, cmd("place_order", "o-2", items=items(("sku-a", 1))))
    assert log.order("o-1").customer == "s-1"
    assert log.order("o-2").customer == "c-2"


# -- precedence --------------------------------------------------------------------------------


def test_bad_request_comes_before_forbidden():
    """A malformed command is `bad_request` even from a role that may never run it."""
    log = order_in("placed")
    assert log.code(AUDITOR, cmd("add_stock", sku="sku-a", quantity=0)) == "bad_request"
    assert log.code(AUDITOR, cmd("approve_order", "o-1", colour="red")) == "bad_request"
    assert log.code(C1, cmd("add_stock", sku="bad sku", quantity=1)) == "bad_request"
    assert log.code(C1, cmd("ship_order", "o 1")) == "bad_request"
    assert log.code(C1, cmd("place_order", "o-9", items=items(("sku-a", 0)), customer="c-2")) == "bad_request"
    assert log.code(C1, cmd("place_order", "o-9", items=items(("sku-a", 1)), customer="c 2")) == "bad_request"
    assert log.code(AUDITOR, cmd("approve_order", "o-1", expected_version=-1)) == "bad_request"
    assert log.code(AUDITOR, cmd("sell_order", "o-1")) == "bad_request"


def test_forbidden_comes_before_not_found_and_conflict():
    """A role that may never run the command is `forbidden` before any lookup: unknown orders, used ids, stale versions."""
    log = order_in("placed")
    assert log.code(C1, cmd("approve_order", "o-unused")) == "forbidden"
    assert log.code(C2, cmd("ship_order", "o-1", expected_version=7)) == "forbidden"
    assert log.code(AUDITOR, cmd("cancel_order", "o-unused")) == "forbidden"
    assert log.code(C1, cmd("place_order", "o-1", items=items(("sku-a", 1)), customer="c-2")) == "forbidden"
    assert log.code(C1, cmd("place_order", "o-9", items=items(("sku-zzz", 1)), customer="c-2")) == "forbidden"
    assert log.code(C1, cmd("add_stock", sku="sku-a", quantity=1, expected_version=9)) == "forbidden"


def test_bad_request_comes_before_not_found():
    """A malformed command on an unknown order is `bad_request`, not `not_found`."""
    log = Log()
    assert log.code(STAFF, cmd("update_order", "o-unused")) == "bad_request"
    assert log.code(STAFF, cmd("cancel_order", "o-unused", reason="")) == "bad_request"
    assert log.code(C1, cmd("ship_order", "o-unused", carrier="x" * 101)) == "bad_request"


def test_not_found_comes_before_conflict_and_invalid_state():
    """An unknown (or invisible) order is `not_found` even with a stale expected_version or in a status that forbids the command."""
    log = order_in("shipped")
    assert log.code(STAFF, cmd("approve_order", "o-unused", expected_version=3)) == "not_found"
    assert log.code(C1, cmd("cancel_order", "o-unused", expected_version=0)) == "not_found"
    assert log.code(C2, cmd("cancel_order", "o-1")) == "not_found"  # c-1's, shipped
    assert log.code(C2, cmd("update_order", "o-1", note="x", expected_version=99)) == "not_found"


def test_conflict_invalid_state_and_insufficient_stock_when_nothing_else_is_wrong():
    """Well-formed, permitted commands on existing orders fail with conflict / invalid_state / insufficient_stock."""
    log = order_in("shipped")
    assert log.code(STAFF, cmd("approve_order", "o-1", expected_version=1)) == "conflict"
    assert log.code(STAFF, cmd("approve_order", "o-1")) == "invalid_state"
    assert log.code(C1, cmd("place_order", "o-2", items=items(("sku-a", 100)))) == "insufficient_stock"
    assert log.code(C1, cmd("place_order", "o-1", items=items(("sku-a", 1)))) == "conflict"


# -- the status flow ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("who", ("owner", "staff"))
@pytest.mark.parametrize("name", ORDER_COMMANDS)
def test_status_transitions(name, who, status):
    """Each order command by the owner or staff is applied exactly in the statuses docs/protocol.md allows, otherwise `invalid_state` (or `forbidden` for customers on staff commands)."""
    log = order_in(status)
    principal = C1 if who == "owner" else STAFF
    command = valid_command(name)
    if who == "owner" and name in STAFF_ONLY:
        assert log.code(principal, command) == "forbidden"
        return
    if status in ALLOWED_FROM[(name, who)]:
        version = log.order().version
        log.run(principal, command, at=LATER)
        order = log.order()
        assert order.status == STATUS_AFTER.get(name, status)
        assert order.version == version + 1
        assert order.updated_at == LATER
    else:
        rejection = log.reject(principal, command)
        assert rejection.code == "invalid_state"
        assert rejection.details is None


def test_cancel_from_approved_by_staff():
    """Staff may cancel an approved order (placed -> approved -> cancelled), which releases its stock."""
    log = order_in("cancelled", via_approved=True)
    assert log.stock("sku-a").to_json()["available"] == 10
    assert log.stock("sku-a").reserved == 0


def test_full_status_flow():
    """An order goes placed -> approved -> shipped -> delivered, and nothing moves it further."""
    log = order_in("delivered")
    for name in ORDER_COMMANDS:
        assert log.code(STAFF, valid_command(name)) == "invalid_state"
    assert log.code(C1, valid_command("cancel_order")) == "invalid_state"
    assert log.code(C1, valid_command("update_order")) == "invalid_state"


def test_unknown_order_is_not_found_for_every_order_command():
    """Every order command on an order id nobody used is `not_found` for staff and owners alike."""
    log = stocked(sku_a=5)
    for name in ORDER_COMMANDS:
        assert log.code(STAFF, valid_command(name, "o-nobody")) == "not_found"
    for name in ("update_order", "cancel_order"):
        assert log.code(C1, valid_command(name, "o-nobody")) == "not_found"


# -- another customer's order does not exist --------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("name", ("update_order", "cancel_order"))
@pytest.mark.parametrize("expected_version", (None, 0, 1, 2, 50))
def test_other_customers_order_looks_like_an_unused_id(name, status, expected_version):
    """A customer acting on another customer's order gets exactly the reply for an order id nobody used, but for the id."""
    log = order_in(status, owner=C1)
    data = valid_command(name).data
    theirs = log.reject(C2, cmd(name, "o-1", expected_version=expected_version, **data))
    unused = log.reject(C2, cmd(name, "o-unused", expected_version=expected_version, **data))
    assert theirs.code == "not_found"
    assert rejection_view(theirs) == (unused.code, unused.message.replace("o-unused", "o-1"), unused.details)
    # and the same as in a log where o-1 was never used at all
    empty = stocked(sku_a=10, sku_b=10).reject(C2, cmd(name, "o-1", expected_version=expected_version, **data))
    assert rejection_view(theirs) == rejection_view(empty)


def test_place_order_of_a_used_id_is_conflict_for_everyone():
    """place_order with an order id already used is `conflict` for the owner, another customer and staff."""
    log = order_in("delivered", owner=C1)
    for principal in (C1, C2, STAFF, Principal("c-3", "customer")):
        assert log.code(principal, cmd("place_order", "o-1", items=items(("sku-a", 1)))) == "conflict"
    cancelled = order_in("cancelled", owner=C2)
    assert cancelled.code(C1, cmd("place_order", "o-1", items=items(("sku-a", 1)))) == "conflict"
    assert cancelled.code(STAFF, cmd("place_order", "o-1", items=items(("sku-a", 1)), customer="c-1")) == "conflict"


def test_conflict_on_used_id_names_no_version_to_a_stranger():
    """The conflict for another customer's order id carries no current_version (it must reveal nothing)."""
    log = order_in("approved", owner=C1)
    stranger = log.reject(C2, cmd("place_order", "o-1", items=items(("sku-a", 1))))
    assert stranger.code == "conflict"
    assert not stranger.details or "current_version" not in stranger.details
    assert "c-1" not in stranger.message


# -- stock -------------------------------------------------------------------------------------


def test_insufficient_stock_names_sku_and_available():
    """Ordering more than is available is `insufficient_stock` with details {"sku", "available"}, and reserves nothing."""
    log = stocked(sku_a=5, sku_b=2)
    rejection = log.reject(C1, cmd("place_order", "o-1", items=items(("sku-a", 5), ("sku-b", 3))))
    assert rejection.code == "insufficient_stock"
    assert rejection.details == {"sku": "sku-b", "available": 2}
    assert log.stock("sku-a").available == 5


def test_insufficient_stock_of_a_sku_never_stocked():
    """A sku nobody ever added has 0 available."""
    log = stocked(sku_a=5)
    rejection = log.reject(C1, cmd("place_order", "o-1", items=items(("sku-a", 1), ("sku-new", 1))))
    assert (rejection.code, rejection.details) == ("insufficient_stock", {"sku": "sku-new", "available": 0})


def test_same_sku_twice_counts_both_lines():
    """An item list naming the same sku twice needs the sum of both quantities to be available."""
    log = stocked(sku_a=5)
    rejection = log.reject(C1, cmd("place_order", "o-1", items=items(("sku-a", 3), ("sku-a", 3))))
    assert (rejection.code, rejection.details) == ("insufficient_stock", {"sku": "sku-a", "available": 5})
    events = log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 3), ("sku-a", 2))))
    assert [e.type for e in events] == ["order-created", "stock-reserved", "stock-reserved"]
    assert [e.data["quantity"] for e in events[1:]] == [3, 2]
    assert log.stock("sku-a").to_json() == {"sku": "sku-a", "name": None, "available": 0, "reserved": 5,
                                            "version": 3, "last_seq": 4}
    assert log.code(C2, cmd("place_order", "o-2", items=items(("sku-a", 1)))) == "insufficient_stock"


def test_stock_arithmetic_through_reserve_ship_and_release():
    """reserve moves available to reserved, ship removes from reserved, release moves back, add raises available."""
    log = stocked(sku_a=10)
    log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 3))))
    log.run(C2, cmd("place_order", "o-2", items=items(("sku-a", 4))))
    assert (log.stock("sku-a").available, log.stock("sku-a").reserved) == (3, 7)
    log.run(STAFF, cmd("approve_order", "o-1"))
    log.run(STAFF, cmd("ship_order", "o-1"))
    assert (log.stock("sku-a").available, log.stock("sku-a").reserved) == (3, 4)
    log.run(C2, cmd("cancel_order", "o-2"))
    assert (log.stock("sku-a").available, log.stock("sku-a").reserved) == (7, 0)
    log.run(STAFF, cmd("add_stock", sku="sku-a", quantity=5))
    assert (log.stock("sku-a").available, log.stock("sku-a").reserved) == (12, 0)
    log.run(STAFF, cmd("deliver_order", "o-1"))
    assert (log.stock("sku-a").available, log.stock("sku-a").reserved) == (12, 0)


def test_stock_name_is_kept_when_a_later_add_gives_none():
    """`name` set by one add_stock stays when a later add_stock gives none, and a new name replaces it."""
    log = Log()
    log.run(STAFF, cmd("add_stock", sku="sku-a", quantity=2, name="Catnip"))
    log.run(STAFF, cmd("add_stock", sku="sku-a", quantity=3))
    assert log.stock("sku-a").to_json() == {"sku": "sku-a", "name": "Catnip", "available": 5, "reserved": 0,
                                            "version": 2, "last_seq": 2}
    log.run(STAFF, cmd("add_stock", sku="sku-a", quantity=1, name="Premium catnip"))
    assert log.stock("sku-a").name == "Premium catnip"


# -- events appended --------------------------------------------------------------------------


def shape(events: list[Event]) -> list[tuple[str, str, dict]]:
    return [(e.stream, e.type, e.data) for e in events]


def test_add_stock_events():
    """add_stock appends one stock-added on sku:<sku> with sku, quantity and name only when given."""
    log = Log()
    assert shape(log.run(STAFF, cmd("add_stock", sku="sku-a", quantity=4))) == [
        ("sku:sku-a", "stock-added", {"sku": "sku-a", "quantity": 4})]
    assert shape(log.run(STAFF, cmd("add_stock", sku="sku-a", quantity=1, name="Bone"))) == [
        ("sku:sku-a", "stock-added", {"sku": "sku-a", "quantity": 1, "name": "Bone"})]


def test_place_order_events():
    """place_order appends order-created (customer, items, optional ship_to/note) then one stock-reserved per item."""
    log = stocked(sku_a=5, sku_b=5)
    assert shape(log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 2), ("sku-b", 1))))) == [
        ("order:o-1", "order-created", {"customer": "c-1", "items": items(("sku-a", 2), ("sku-b", 1))}),
        ("sku:sku-a", "stock-reserved", {"sku": "sku-a", "quantity": 2, "order_id": "o-1"}),
        ("sku:sku-b", "stock-reserved", {"sku": "sku-b", "quantity": 1, "order_id": "o-1"}),
    ]
    events = log.run(STAFF, cmd("place_order", "o-2", items=items(("sku-b", 1)), ship_to="1 Elm St",
                                note="fragile", customer="c-2"))
    assert shape(events) == [
        ("order:o-2", "order-created",
         {"customer": "c-2", "items": items(("sku-b", 1)), "ship_to": "1 Elm St", "note": "fragile"}),
        ("sku:sku-b", "stock-reserved", {"sku": "sku-b", "quantity": 1, "order_id": "o-2"}),
    ]
    assert [(e.seq, e.version) for e in events] == [(6, 1), (7, 3)]


def test_update_order_events_carry_only_the_given_fields():
    """update_order appends order-updated with exactly the fields given, and the order keeps the other one."""
    log = stocked(sku_a=5)
    log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 1)), ship_to="old address", note="old note"))
    assert shape(log.run(C1, cmd("update_order", "o-1", ship_to="new address"))) == [
        ("order:o-1", "order-updated", {"ship_to": "new address"})]
    assert (log.order().ship_to, log.order().note) == ("new address", "old note")
    assert shape(log.run(STAFF, cmd("update_order", "o-1", note="n2"))) == [
        ("order:o-1", "order-updated", {"note": "n2"})]
    assert shape(log.run(C1, cmd("update_order", "o-1", ship_to="a3", note="n3"))) == [
        ("order:o-1", "order-updated", {"ship_to": "a3", "note": "n3"})]
    assert (log.order().ship_to, log.order().note) == ("a3", "n3")


def test_approve_ship_deliver_events():
    """approve and deliver append an empty-data event; ship appends order-shipped (carrier?, tracking?) then one stock-shipped per item."""
    log = stocked(sku_a=5, sku_b=5)
    log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 2), ("sku-b", 1))))
    log.run(C2, cmd("place_order", "o-2", items=items(("sku-a", 1))))
    assert shape(log.run(STAFF, cmd("approve_order", "o-1"))) == [("order:o-1", "order-approved", {})]
    assert shape(log.run(STAFF, cmd("ship_order", "o-1", carrier="DHL", tracking="JD0001"))) == [
        ("order:o-1", "order-shipped", {"carrier": "DHL", "tracking": "JD0001"}),
        ("sku:sku-a", "stock-shipped", {"sku": "sku-a", "quantity": 2, "order_id": "o-1"}),
        ("sku:sku-b", "stock-shipped", {"sku": "sku-b", "quantity": 1, "order_id": "o-1"}),
    ]
    assert shape(log.run(STAFF, cmd("deliver_order", "o-1"))) == [("order:o-1", "order-delivered", {})]
    log.run(STAFF, cmd("approve_order", "o-2"))
    assert shape(log.run(STAFF, cmd("ship_order", "o-2", tracking="T-2"))) == [
        ("order:o-2", "order-shipped", {"tracking": "T-2"}),
        ("sku:sku-a", "stock-shipped", {"sku": "sku-a", "quantity": 1, "order_id": "o-2"}),
    ]


def test_cancel_order_events():
    """cancel appends order-cancelled (reason only when given) then one stock-released per item."""
    log = stocked(sku_a=5, sku_b=5)
    log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 2), ("sku-b", 1))))
    log.run(C1, cmd("place_order", "o-2", items=items(("sku-b", 2))))
    assert shape(log.run(C1, cmd("cancel_order", "o-1", reason="too slow"))) == [
        ("order:o-1", "order-cancelled", {"reason": "too slow"}),
        ("sku:sku-a", "stock-released", {"sku": "sku-a", "quantity": 2, "order_id": "o-1"}),
        ("sku:sku-b", "stock-released", {"sku": "sku-b", "quantity": 1, "order_id": "o-1"}),
    ]
    assert shape(log.run(STAFF, cmd("cancel_order", "o-2"))) == [
        ("order:o-2", "order-cancelled", {}),
        ("sku:sku-b", "stock-released", {"sku": "sku-b", "quantity": 2, "order_id": "o-2"}),
    ]


# -- shapes -------------------------------------------------------------------------------------


def test_order_shape():
    """Order.to_json has exactly the docs/protocol.md keys, with null ship_to/note when never given and times of the first and last order event."""
    log = stocked(sku_a=5)
    log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 2), ("sku-a", 1))), at=AT)
    assert log.order().to_json() == {
        "order_id": "o-1", "customer": "c-1", "status": "placed", "items": items(("sku-a", 2), ("sku-a", 1)),
        "ship_to": None, "note": None, "version": 1, "created_at": AT, "updated_at": AT, "last_seq": 2,
    }
    log.run(STAFF, cmd("approve_order", "o-1"), at=LATER)
    assert log.order().to_json() == {
        "order_id": "o-1", "customer": "c-1", "status": "approved", "items": items(("sku-a", 2), ("sku-a", 1)),
        "ship_to": None, "note": None, "version": 2, "created_at": AT, "updated_at": LATER, "last_seq": 5,
    }


def test_stock_shape():
    """Stock.to_json has exactly the docs/protocol.md keys."""
    log = stocked(sku_a=5)
    assert log.stock("sku-a").to_json() == {"sku": "sku-a", "name": None, "available": 5, "reserved": 0,
                                            "version": 1, "last_seq": 1}


# -- expected_version -----------------------------------------------------------------------


def test_expected_version_match_mismatch_and_new_stream():
    """expected_version equal to the stream's version succeeds, a mismatch is `conflict` with current_version, and a new stream is at 0."""
    log = stocked(sku_a=5)
    assert log.reject(STAFF, cmd("add_stock", sku="sku-b", quantity=1, expected_version=1)).details == {
        "current_version": 0}
    log.run(STAFF, cmd("add_stock", sku="sku-b", quantity=1, expected_version=0))
    rejection = log.reject(STAFF, cmd("add_stock", sku="sku-a", quantity=1, expected_version=0))
    assert (rejection.code, rejection.details) == ("conflict", {"current_version": 1})
    rejection = log.reject(C1, cmd("place_order", "o-1", items=items(("sku-a", 1)), expected_version=1))
    assert (rejection.code, rejection.details) == ("conflict", {"current_version": 0})
    log.run(C1, cmd("place_order", "o-1", items=items(("sku-a", 1)), expected_version=0))
    rejection = log.reject(C1, cmd("update_order", "o-1", note="x", expected_version=0))
    assert (rejection.code, rejection.details) == ("conflict", {"current_version": 1})
    log.run(C1, cmd("update_order", "o-1", note="x", expected_version=1))
    log.run(STAFF, cmd("approve_order", "o-1", expected_version=2))
    assert log.order().version == 3


# -- validation -------------------------------------------------------------------------------


BAD_COMMANDS = [
    cmd("add_stock", sku="sku-a", quantity=0),
    cmd("add_stock", sku="sku-a", quantity=-1),
    cmd("add_stock", sku="sku-a", quantity=True),
    cmd("add_stock", sku="sku-a", quantity=1.0),
    cmd("add_stock", sku="sku-a", quantity="1"),
    cmd("add_stock", sku="sku-a"),
    cmd("add_stock", quantity=1),
    cmd("add_stock", sku="", quantity=1),
    cmd("add_stock", sku="x" * 65, quantity=1),
    cmd("add_stock", sku="caf\u00e9", quantity=1),
    cmd("add_stock", sku="sku-a", quantity=1, name=""),
    cmd("add_stock", sku="sku-a", quantity=1, price=3),
    cmd("add_stock", "o-1", sku="sku-a", quantity=1),
    cmd("place_order", "o-1"),
    cmd("place_order", items=items(("sku-a", 1))),
    cmd("place_order", "o-1", items=[]),
    cmd("place_order", "o-1", items=items(*[("sku-a", 1)] * 101)),
    cmd("place_order", "o-1", items=items(("sku-a", 0))),
    cmd("place_order", "o-1", items=items(("sku-a", 1001))),
    cmd("place_order", "o-1", items=[{"sku": "sku-a"}]),
    cmd("place_order", "o-1", items=[{"sku": "sku-a", "quantity": 1, "price": 2}]),
    cmd("place_order", "o-1", items=["sku-a"]),
    cmd("place_order", "o-1", items={"sku": "sku-a", "quantity": 1}),
    cmd("place_order", "o-1", items=items(("sku-a", 1)), ship_to="x" * 501),
    cmd("place_order", "o-1", items=items(("sku-a", 1)), note=5),
    cmd("place_order", "o-1", items=items(("sku-a", 1)), gift=True),
    cmd("place_order", "bad id", items=items(("sku-a", 1))),
    cmd("place_order", "o-1", items=items(("sku-a", 1)), expected_version=-1),
    cmd("place_order", "o-1", items=items(("sku-a", 1)), expected_version=False),
    cmd("update_order", "o-1"),
    cmd("update_order", "o-1", reason="x"),
    cmd("update_order", note="x"),
    cmd("approve_order", "o-1", note="x"),
    cmd("ship_order", "o-1", tracking=""),
    cmd("deliver_order", "x" * 65),
    cmd("cancel_order", "o-1", reason="x" * 501),
    cmd("refund_order", "o-1"),
]


@pytest.mark.parametrize("command", BAD_COMMANDS, ids=lambda c: f"{c.name}:{sorted(c.data)}")
def test_malformed_commands_are_bad_request_for_every_role(command):
    """Malformed ids, quantities, item lists, texts, unknown fields and names are `bad_request`, whoever sends them."""
    log = order_in("placed")
    for principal in (STAFF, C1, C2, AUDITOR):
        assert log.code(principal, command) == "bad_request"


def test_limits_are_inclusive():
    """The largest allowed values (64-char ids, 1000 per line, 100 items, 500-char ship_to) are accepted."""
    log = stocked(sku_a=200_000)
    log.run(STAFF, cmd("add_stock", sku="S" * 64, quantity=1000, name="n" * 200))
    log.run(C1, cmd("place_order", "o" * 64, items=items(*[("sku-a", 1000)] * 100), ship_to="a" * 500,
                    note="b" * 1000))
    assert log.stock("sku-a").reserved == 100_000
    log.run(STAFF, cmd("approve_order", "o" * 64))
    log.run(STAFF, cmd("ship_order", "o" * 64, carrier="c" * 100, tracking="t" * 100))


# -- properties on random traffic ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(request_sequences())
def test_decide_is_pure_and_fold_matches_evolve(sequence):
    """decide neither mutates its inputs nor depends on anything but them, and fold equals evolve applied one event at a time."""
    log = Log()
    for request in sequence:
        state_before = log.state
        data_before = repr(request.command.data)
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(("ok", decide(request.command, request.principal, log.state)))
            except Rejected as rejection:
                outcomes.append(("rejected", rejection_view(rejection)))
        assert outcomes[0] == outcomes[1]
        assert log.state == state_before and repr(request.command.data) == data_before
        if outcomes[0][0] == "ok":
            log.run(request.principal, request.command, at=request.at)
    assert fold(log.events) == log.state
    for stock in log.state.stock.values():
        assert stock.available >= 0 and stock.reserved >= 0


@settings(max_examples=40, deadline=None)
@given(request_sequences())
def test_error_precedence_on_random_commands(sequence):
    """bad_request depends on the command alone, forbidden on the command and role alone, and auditors get one of the two."""
    log = Log()
    empty = State()
    principals = (STAFF, AUDITOR, Principal("c-1", "customer"), Principal("c-2", "customer"))
    for request in sequence:
        command = request.command
        codes = {}
        for principal in principals:
            for which, state in (("now", log.state), ("empty", empty)):
                try:
                    decide(command, principal, state)
                    codes[principal, which] = "ok"
                except Rejected as rejection:
                    codes[principal, which] = rejection.code
        if "bad_request" in codes.values():
            assert set(codes.values()) == {"bad_request"}
        else:
            assert codes[AUDITOR, "now"] == codes[AUDITOR, "empty"] == "forbidden"
            for principal in principals:
                assert (codes[principal, "now"] == "forbidden") == (codes[principal, "empty"] == "forbidden")
        try:
            log.run(request.principal, command, at=request.at)
        except Rejected:
            pass


@settings(max_examples=40, deadline=None)
@given(request_sequences(), st.sampled_from(CUSTOMERS), st.data())
def test_other_customers_orders_are_indistinguishable_from_unused_ids(sequence, stranger, data):
    """For random states, any order command by a customer on an order it does not own answers as if the order did not exist."""
    log = Log()
    for request in sequence:
        try:
            log.run(request.principal, request.command, at=request.at)
        except Rejected:
            pass
    principal = Principal(stranger, "customer")
    for order_id, order in log.state.orders.items():
        if order.customer == stranger:
            continue
        without = State({k: v for k, v in log.state.orders.items() if k != order_id}, log.state.stock)
        name = data.draw(st.sampled_from(ORDER_COMMANDS))
        extra = data.draw(st.fixed_dictionaries({}, optional={"note": st.just("n"), "ship_to": st.just("s")}))
        if name == "update_order" and not extra:
            extra = {"note": "n"}
        if name != "update_order":
            extra = {}
        command = cmd(name, order_id, expected_version=data.draw(st.none() | st.integers(0, 5)), **extra)
        views = []
        for state in (log.state, without):
            with pytest.raises(Rejected) as info:
                decide(command, principal, state)
            views.append(rejection_view(info.value))
        assert views[0] == views[1]
        assert views[0][0] in ("not_found", "forbidden")


def test_the_named_constants_are_the_documented_strings():
    """ERROR_CODES, ROLES and the statuses are exactly the ones docs/protocol.md lists, in its order."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8")
    codes = re.search(r"codes: (.*?)\.\n", text, re.S).group(1)
    assert tuple(re.findall(r"`([a-z_]+)`", codes)) == ERROR_CODES
    assert ROLES == ("customer", "staff", "auditor")
    assert {Status.PLACED, Status.APPROVED, Status.SHIPPED, Status.DELIVERED, Status.CANCELLED} == \
        {"placed", "approved", "shipped", "delivered", "cancelled"}

