"""A deterministic generator of a realistic pet-store history (for demos, tests, benchmarks).

Rules of this file: no I/O, no clock. Randomness comes only from a `random.Random(seed)`
owned by the generator, and times come in as an argument, so the same seed and the same
starting stock give the same commands.

Theory of operation. The generator keeps a small model of the store: the believed
`available` stock per sku and the orders it placed, pooled by status. Each command is drawn
against that model and the model is updated at once with the *predicted* outcome (the same
rules as `domain.decide`: enough stock, the right status), so one batch may place an order
and approve it. Some commands are meant to fail as they do in real life: a customer orders
more than is left (`insufficient_stock`), changes or cancels an order staff already approved
(`invalid_state`), staff ship an order nobody approved yet (`invalid_state`). After the
store answered, `observe` compares each outcome with the prediction; a surprise (possible
only when someone else writes to the same log) drops that order from the model, and
`sync_stock` resets the stock beliefs from the store. On a fresh log nothing is surprising,
so the history does not depend on the batch size.

Ids are prefixed with a run tag (e.g. the log's head when the run started), so a second
run on the same log makes new orders and new command ids instead of colliding.
"""

from __future__ import annotations

import bisect
import itertools
import random
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

import attrs

from .canonical import format_time
from .domain import Command, ErrorCode, Principal, Rejected, Role, Status
from .records import Ack, Request

# (sku, name, popularity): popular items sell out more often.
CATALOG: tuple[tuple[str, str, int], ...] = (
    ("dog-food-2kg", "Dry dog food, 2 kg", 9),
    ("dog-food-12kg", "Dry dog food, 12 kg", 6),
    ("cat-food-1kg", "Dry cat food, 1 kg", 9),
    ("cat-food-wet-12", "Wet cat food, 12 cans", 8),
    ("cat-litter-10l", "Clumping cat litter, 10 l", 7),
    ("bird-seed-1kg", "Wild bird seed, 1 kg", 3),
    ("fish-flakes-100g", "Tropical fish flakes, 100 g", 3),
    ("hamster-bedding", "Paper hamster bedding", 2),
    ("rabbit-hay-1kg", "Timothy hay, 1 kg", 3),
    ("dog-leash-red", "Nylon leash, red", 2),
    ("dog-leash-blue", "Nylon leash, blue", 2),
    ("dog-collar-m", "Dog collar, size M", 2),
    ("dog-collar-l", "Dog collar, size L", 2),
    ("cat-tree-120", "Cat tree, 120 cm", 1),
    ("cat-scratcher", "Cardboard scratcher", 3),
    ("dog-bed-80", "Dog bed, 80 cm", 1),
    ("chew-toy-bone", "Rubber chew bone", 4),
    ("tennis-balls-3", "Tennis balls, pack of 3", 4),
    ("catnip-mouse", "Catnip mouse", 4),
    ("aquarium-60l", "Aquarium kit, 60 l", 1),
    ("aquarium-filter", "Aquarium filter", 1),
    ("bird-cage-s", "Bird cage, small", 1),
    ("flea-drops-dog", "Flea drops for dogs", 3),
    ("flea-drops-cat", "Flea drops for cats", 3),
    ("poop-bags-120", "Poop bags, 120", 5),
    ("grooming-brush", "Grooming brush", 2),
    ("nail-clipper", "Nail clipper", 1),
    ("pet-shampoo", "Oatmeal pet shampoo", 2),
    ("treats-chicken", "Chicken treats", 6),
    ("treats-salmon", "Salmon treats", 5),
)
CUSTOMERS = tuple(f"cust-{i:03d}" for i in range(1, 241))
STAFF = ("staff-ana", "staff-ben", "staff-chen", "staff-dee")
ADDRESSES = (
    "12 Oak Street, Springfield",
    "4 Harbour Road, Portsmouth",
    "77 Rue des Lilas, Lyon",
    "Flat 3, 9 Mill Lane, Leeds",
    "221B Baker Street, London",
    "5 Kastanienallee, Berlin",
)
NOTES = ("leave at the door", "ring twice", "gift, no invoice please", "call before delivery")
CARRIERS = ("PostNL", "DHL", "UPS", "La Poste")
CANCEL_REASONS = ("changed my mind", "found it cheaper", "ordered twice by mistake", "out of budget")

OPENING_STOCK = 50  # a sku below this at the start of a run gets a first delivery
RESTOCK_BELOW = 40  # staff restock a sku they notice below this
BIG_ORDER_CHANCE = 0.04  # a line asking for an unusually large quantity

# How often each kind of command comes up (before falling back when its pool is empty).
WEIGHTS: tuple[tuple[str, float], ...] = (
    ("place_order", 27),
    ("approve_order", 22),
    ("ship_order", 20),
    ("deliver_order", 18),
    ("update_order", 5),
    ("cancel_order", 4),
    ("add_stock", 3),
    ("mistake", 1),
)


# The staff steps of an order: the status each one needs, and the status it leads to.
_ADVANCES_FROM = {"approve_order": Status.PLACED, "ship_order": Status.APPROVED, "deliver_order": Status.SHIPPED}
_ADVANCES_TO = {"approve_order": Status.APPROVED, "ship_order": Status.SHIPPED, "deliver_order": Status.DELIVERED}


@attrs.define
class SeedOrder:
    """What the generator believes about one order it placed."""

    order_id: str
    customer: str
    status: str
    items: tuple[tuple[str, int], ...]


class _Pool:
    """A set with O(1) add, remove and seeded random pick (insertion-ordered, so deterministic)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, key: str) -> None:
        self.where[key] = len(self.items)
        self.items.append(key)

    def remove(self, key: str) -> None:
        i = self.where.pop(key)
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.where[last] = i

    def pick(self, rng: random.Random) -> str:
        return self.items[rng.randrange(len(self.items))]


@attrs.define
class Planned:
    """A generated request and the outcome the generator expects (None: accepted, else a code)."""

    request: Request
    expect: str | None


class SeedGenerator:
    """Produces pet-store `Request`s; see the module docstring."""

    def __init__(self, seed: int, run: str = "r0", stock: Mapping[str, int] | None = None):
        self.rng = random.Random(seed)
        self.run = run
        self.available: dict[str, int] = {sku: 0 for sku, _, _ in CATALOG}
        if stock:
            self.sync_stock(stock)
        self.orders: dict[str, SeedOrder] = {}
        self.pools = {status: _Pool() for status in (Status.PLACED, Status.APPROVED, Status.SHIPPED)}
        self.commands = 0
        self.placed = 0
        self._principals: dict[str, Principal] = {}  # one (immutable) Principal per user
        self._skus = [sku for sku, _, _ in CATALOG]
        self._popularity = list(itertools.accumulate(p for _, _, p in CATALOG))
        self._names = {sku: name for sku, name, _ in CATALOG}
        self._kinds = [k for k, _ in WEIGHTS]
        self._weights = list(itertools.accumulate(w for _, w in WEIGHTS))
        # A first delivery of everything that is short when the run starts.
        self._opening = [sku for sku in self._skus if self.available[sku] < OPENING_STOCK]

    # the model ------------------------------------------------------------------------------

    def sync_stock(self, stock: Mapping[str, int]) -> None:
        """Reset the believed available stock of the catalog's skus (from the store)."""
        for sku in self.available:
            self.available[sku] = stock.get(sku, 0)

    def observe(self, planned: Planned, outcome: Ack | Rejected) -> bool:
        """Check one outcome against the prediction; False (and the order forgotten) on a surprise."""
        got = outcome.code if isinstance(outcome, Rejected) else None
        if got == planned.expect:
            return True
        order_id = planned.request.command.order_id
        if order_id in self.orders:
            self._forget(order_id)
        return False

    def _forget(self, order_id: str) -> None:
        order = self.orders.pop(order_id)
        pool = self.pools.get(order.status)
        if pool is not None and order_id in pool.where:
            pool.remove(order_id)

    def _move(self, order: SeedOrder, status: str) -> None:
        if order.status in self.pools:
            self.pools[order.status].remove(order.order_id)
        order.status = status
        if status in self.pools:
            self.pools[status].add(order.order_id)
        else:  # delivered or cancelled: nothing more will happen to it
            del self.orders[order.order_id]

    # generating -----------------------------------------------------------------------------

    def batch(self, times: Sequence[str]) -> list[Planned]:
        """The next commands, one arriving at each of `times`."""
        return [self.next(at) for at in times]

    def next(self, at: str) -> Planned:
        """The next command and its expected outcome; the model already reflects it."""
        self.commands += 1
        if self._opening:
            sku = self._opening.pop(0)
            return self._add_stock(at, sku, self.rng.randint(150, 400))
        kind = self._kinds[self._weighted(self._weights)]
        if kind == "place_order":
            return self._place_order(at)
        if kind == "add_stock":
            return self._restock(at)
        if kind == "mistake":
            return self._mistake(at)
        status = _ADVANCES_FROM.get(kind)
        if status is not None:
            if not self.pools[status]:
                return self._place_order(at)
            order = self.orders[self.pools[status].pick(self.rng)]
            return self._advance(at, kind, order)
        if kind == "update_order":
            return self._update_order(at)
        return self._cancel_order(at)

    def _weighted(self, cumulative: list[float]) -> int:
        """A seeded index drawn with the weights whose running sums are `cumulative`."""
        return bisect.bisect(cumulative, self.rng.random() * cumulative[-1])

    def _request(self, at: str, user: str, role: str, name: str, order_id: str | None,
                 data: dict[str, Any], expect: str | None) -> Planned:
        command = Command(name, f"{self.run}-c{self.commands}", order_id, None, data)
        principal = self._principals.get(user)
        if principal is None or principal.role != role:
            principal = self._principals[user] = Principal(user, role)
        return Planned(Request(principal, command, at), expect)

    def _staff(self) -> str:
        return STAFF[self.rng.randrange(len(STAFF))]

    def _add_stock(self, at: str, sku: str, quantity: int) -> Planned:
        data: dict[str, Any] = {"sku": sku, "quantity": quantity}
        if self.rng.random() < 0.3:
            data["name"] = self._names[sku]
        self.available[sku] += quantity
        return self._request(at, self._staff(), Role.STAFF, "add_stock", None, data, None)

    def _restock(self, at: str) -> Planned:
        # Staff walk the shelves and refill the emptiest of a few skus they look at.
        looked = [self._skus[self.rng.randrange(len(self._skus))] for _ in range(4)]
        sku = min(looked, key=lambda s: self.available[s])
        if self.available[sku] >= RESTOCK_BELOW and self.rng.random() < 0.5:
            return self._place_order(at)
        return self._add_stock(at, sku, self.rng.randint(40, 160))

    def _place_order(self, at: str) -> Planned:
        self.placed += 1
        order_id = f"{self.run}-o{self.placed:07d}"  # zero-padded: new orders sort last, cheap to index
        customer = CUSTOMERS[self.rng.randrange(len(CUSTOMERS))]
        count = self.rng.choice((1, 1, 1, 2, 2, 3))
        skus: list[str] = []
        while len(skus) < count:
            sku = self._skus[self._weighted(self._popularity)]
            if sku not in skus:
                skus.append(sku)
        items = []
        for sku in skus:
            big = self.rng.random() < BIG_ORDER_CHANCE
            items.append((sku, self.rng.randint(20, 60) if big else self.rng.choice((1, 1, 1, 2, 2, 3, 4, 6))))
        data: dict[str, Any] = {"items": [{"sku": s, "quantity": q} for s, q in items]}
        if self.rng.random() < 0.8:
            data["ship_to"] = self.rng.choice(ADDRESSES)
        if self.rng.random() < 0.1:
            data["note"] = self.rng.choice(NOTES)
        if self.rng.random() < 0.05:  # a phone order, typed in by staff
            data["customer"] = customer
            user, role = self._staff(), Role.STAFF
        else:
            user, role = customer, Role.CUSTOMER
        if any(self.available[s] < q for s, q in items):  # skus are distinct within an order
            return self._request(at, user, role, "place_order", order_id, data, ErrorCode.INSUFFICIENT_STOCK)
        for s, q in items:
            self.available[s] -= q
        self.orders[order_id] = SeedOrder(order_id, customer, Status.PLACED, tuple(items))
        self.pools[Status.PLACED].add(order_id)
        return self._request(at, user, role, "place_order", order_id, data, None)

    def _advance(self, at: str, name: str, order: SeedOrder) -> Planned:
        data: dict[str, Any] = {}
        if name == "ship_order":
            data["carrier"] = self.rng.choice(CARRIERS)
            data["tracking"] = f"{data['carrier'][:2].upper()}{self.rng.randrange(10**9):09d}"
        self._move(order, _ADVANCES_TO[name])
        return self._request(at, self._staff(), Role.STAFF, name, order.order_id, data, None)

    def _pick_open(self) -> SeedOrder | None:
        """A placed or approved order (where updates and cancels happen), if any."""
        placed, approved = self.pools[Status.PLACED], self.pools[Status.APPROVED]
        if not placed and not approved:
            return None
        pool = placed if self.rng.randrange(len(placed) + len(approved)) < len(placed) else approved
        return self.orders[pool.pick(self.rng)]

    def _update_order(self, at: str) -> Planned:
        order = self._pick_open()
        if order is None:
            return self._place_order(at)
        data: dict[str, Any] = {}
        if self.rng.random() < 0.7:
            data["ship_to"] = self.rng.choice(ADDRESSES)
        if not data or self.rng.random() < 0.3:
            data["note"] = self.rng.choice(NOTES)
        if self.rng.random() < 0.7:  # the customer, who may change only a placed order
            expect = None if order.status == Status.PLACED else ErrorCode.INVALID_STATE
            return self._request(at, order.customer, Role.CUSTOMER, "update_order", order.order_id, data, expect)
        return self._request(at, self._staff(), Role.STAFF, "update_order", order.order_id, data, None)

    def _cancel_order(self, at: str) -> Planned:
        order = self._pick_open()
        if order is None:
            return self._place_order(at)
        data: dict[str, Any] = {}
        if self.rng.random() < 0.6:
            data["reason"] = self.rng.choice(CANCEL_REASONS)
        if self.rng.random() < 0.7:
            user, role = order.customer, Role.CUSTOMER
            expect = None if order.status == Status.PLACED else ErrorCode.INVALID_STATE
        else:
            user, role, expect = self._staff(), Role.STAFF, None
        if expect is None:
            for sku, q in order.items:
                self.available[sku] += q
            self._move(order, Status.CANCELLED)
        return self._request(at, user, role, "cancel_order", order.order_id, data, expect)

    def _mistake(self, at: str) -> Planned:
        # Staff skip a step: ship an order nobody approved, or deliver one not yet shipped.
        if self.pools[Status.PLACED]:
            order = self.orders[self.pools[Status.PLACED].pick(self.rng)]
            return self._request(at, self._staff(), Role.STAFF, "ship_order", order.order_id, {}, ErrorCode.INVALID_STATE)
        if self.pools[Status.APPROVED]:
            order = self.orders[self.pools[Status.APPROVED].pick(self.rng)]
            return self._request(at, self._staff(), Role.STAFF, "deliver_order", order.order_id, {}, ErrorCode.INVALID_STATE)
        return self._place_order(at)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_DAY_MS = 86_400_000


def history_times(start: datetime, end: datetime, first: int, count: int, total: int) -> list[str]:
    """The `at` of commands `first .. first+count-1` of a seed run of `total` commands spread evenly
    from `start` (the first) to `end` (the last): a simulated history, non-decreasing, the same for
    the same inputs.

    In whole milliseconds (exact, no float), formatted as format_time writes them, the date once a day:
    formatting each time through a datetime cost the seed 5% of its rate."""
    start_ms = (start - _EPOCH) // _MS
    span = max((end - start) // _MS, 0)
    times = []
    day, prefix = None, ""
    for i in range(first, first + count):
        days, ms = divmod(start_ms + span * i // max(total - 1, 1), _DAY_MS)
        if days != day:
            day, prefix = days, format_time(_EPOCH + timedelta(days=days))[:11]  # "YYYY-MM-DDT"
        hours, ms = divmod(ms, 3_600_000)
        minutes, ms = divmod(ms, 60_000)
        times.append(f"{prefix}{hours:02d}:{minutes:02d}:{ms // 1000:02d}.{ms % 1000:03d}Z")
    return times
