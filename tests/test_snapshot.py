"""The projection feed and state as of a seq (PROTOCOL.md section 6), over real sockets to a real
server and SQLite file: snapshot-then-live folded equals the log's fold while commands race the
snapshot (a hypothesis property), frame limits, customers' isolation, `get as_of` and
`orderlog state --at` against a fold of the log's prefix, and a client that stops reading.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import random
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orderlog.domain import Event, Order, Stock, evolve_order, evolve_stock, fold
from orderlog.records import Filter
from orderlog.snapshot import MAX_FRAME_BYTES, MAX_ROWS, SnapshotPager, row_json
from orderlog.store import Store, open_store
from wsclient import EVENT_TYPES, TIMEOUT, Session, next_id, running_server, session, stock_up

UNLIMITED = {"rate_limit": 1e9, "rate_burst": 10**9, "user_rate_limit": 1e9, "user_replay_rate": 1e9}
SKUS = {"cat-food": 10_000, "dog-bed": 10_000, "fish-net": 10_000}


# -- helpers ---------------------------------------------------------------------------------


async def take_snapshot(client: Session, channel: str, timeout: float = TIMEOUT) -> tuple[dict, list[dict], list[dict]]:
    """Subscribe to `channel` with a snapshot; return (subscribed, snapshot frames, rows)."""
    request_id = next_id("s")
    await client.send({"type": "subscribe", "id": request_id, "channel": channel, "snapshot": True})
    subscribed = await client.reply_to(request_id, timeout)
    assert subscribed["type"] == "subscribed", subscribed
    frames = await client.until(lambda f: f["type"] == "snapshot" and f["channel"] == channel and f["last"], timeout)
    # Nothing of the channel but its snapshot frames comes before the last one.
    assert all(f["type"] == "snapshot" for f in frames if f.get("channel") == channel), frames
    mine = [f for f in frames if f.get("channel") == channel]
    client.inbox[:0] = [f for f in frames if f.get("channel") != channel]
    return subscribed, mine, [row for f in mine for row in f["rows"]]


def order_of(row: dict) -> Order:
    return Order(row["order_id"], row["customer"], row["status"], tuple((i["sku"], i["quantity"]) for i in row["items"]),
                 row["ship_to"], row["note"], row["version"], row["created_at"], row["updated_at"], row["last_seq"])


def stock_of(row: dict) -> Stock:
    return Stock(**row)


def event_of(frame: dict) -> Event:
    return Event(frame["seq"], frame["stream"], frame["version"], frame["type"], frame["at"], frame["actor"],
                 frame["command_id"], frame["data"], frame["hash"])


def visible(channel: str, user: str, role: str, state) -> dict[str, dict]:
    """The rows of `state` that `channel` shows to (user, role), as JSON shapes by key."""
    if channel == "inventory":
        return {k: s.to_json() for k, s in state.stock.items()}
    orders = {k: o for k, o in state.orders.items() if role != "customer" or o.customer == user}
    if channel.startswith("order:"):
        orders = {k: o for k, o in orders.items() if k == channel[6:]}
    return {k: o.to_json() for k, o in orders.items()}


def log_fold(db: str, until: int):
    """The fold of the log's events with seq <= until (the oracle: no projection table involved)."""
    store = open_store(db, readonly=True)
    try:
        return fold(store.iter_events(Filter(until=until)))
    finally:
        store.close()


def last_visible(db: str, channel: str, user: str, role: str, after: int, until: int) -> int:
    """The seq of the last event in (after, until] the channel shows (after if none)."""
    store = open_store(db, readonly=True)
    try:
        last = after
        for event in store.iter_events(Filter(after=after, until=until)):
            if channel == "inventory":
                seen = event.stream.startswith("sku:")
            elif channel.startswith("order:"):
                seen = event.stream == channel
            else:
                seen = event.stream.startswith("order:") and (
                    role != "customer" or store.get_order(event.stream[6:]).customer == user)
            if seen:
                last = event.seq
        return last
    finally:
        store.close()


class Follower:
    """One snapshot-then-live subscription, folded as the frames come."""

    def __init__(self, client: Session, channel: str, user: str, role: str):
        self.client, self.channel, self.user, self.role = client, channel, user, role
        self.rows: dict[str, Any] = {}
        self.seq = 0  # the snapshot's seq
        self.last = 0  # the last seq folded

    async def start(self) -> None:
        subscribed, frames, rows = await take_snapshot(self.client, self.channel)
        assert subscribed["snapshot"] is True and subscribed["since"] == subscribed["head"]
        self.seq = self.last = subscribed["since"]
        assert all(f["seq"] == self.seq for f in frames)
        assert frames[0]["total"] == len(rows) and all("total" not in f for f in frames[1:])
        assert [f["last"] for f in frames] == [False] * (len(frames) - 1) + [True]
        key = "sku" if self.channel == "inventory" else "order_id"
        keys = [r[key] for r in rows]
        assert keys == sorted(keys) and len(set(keys)) == len(keys), keys
        self.rows = {r[key]: (stock_of(r) if key == "sku" else order_of(r)) for r in rows}

    async def follow_until(self, seq: int) -> None:
        """Fold the channel's events until the one at `seq` (or nothing to wait for)."""
        while self.last < seq:
            frame = await self.client.recv()
            if frame.get("channel") != self.channel or frame["type"] not in EVENT_TYPES:
                continue
            assert frame["prev"] == self.last, (frame, self.last)  # no gap, no duplicate, nothing <= N
            assert frame["seq"] > self.last
            event = event_of(frame)
            key = event.stream.partition(":")[2]
            if self.channel == "inventory":
                self.rows[key] = evolve_stock(self.rows.get(key), event)
            else:
                self.rows[key] = evolve_order(self.rows.get(key), event)
            self.last = frame["seq"]

    def shapes(self) -> dict[str, dict]:
        return {k: v.to_json() for k, v in self.rows.items()}


# -- the pager (pure) ------------------------------------------------------------------------


@given(sizes=st.lists(st.integers(2, 3000), max_size=60), max_rows=st.integers(1, 7),
       max_bytes=st.integers(3100, 9000), total=st.integers(0, 10**6))
def test_pager_frames_hold_every_row_once_within_the_limits(sizes, max_rows, max_bytes, total):
    """Rows cut into frames come out once each, in order, each frame within both limits; the first
    frame carries total, only the final one says last."""
    rows = [b'"' + b"x" * (n - 2) + b'"' for n in sizes]
    pager = SnapshotPager("orders", 17, total, max_rows=max_rows, max_bytes=max_bytes)
    texts = []
    for start in range(0, len(rows), 5):
        texts += pager.add(rows[start : start + 5])
    texts.append(pager.finish())
    frames = [json.loads(t) for t in texts]
    assert all(len(t) <= max_bytes and len(f["rows"]) <= max_rows for t, f in zip(texts, frames))
    assert [r for f in frames for r in f["rows"]] == [json.loads(r) for r in rows]
    assert frames[0]["total"] == total and all("total" not in f for f in frames[1:])
    assert [f["last"] for f in frames] == [False] * (len(frames) - 1) + [True]
    assert all(f["rows"] for f in frames) or rows == []
    assert all(f["type"] == "snapshot" and f["channel"] == "orders" and f["seq"] == 17 for f in frames)


@given(groups=st.lists(st.tuples(st.integers(1, 4), st.integers(2, 400)), max_size=40),
       max_rows=st.integers(4, 9), max_bytes=st.integers(1800, 4000))
def test_pager_groups_are_never_split_and_frames_stay_within_the_limits(groups, max_rows, max_bytes):
    """Rows the store joined (a group) go into one frame together, beside single rows, within
    both limits, in order."""
    pager = SnapshotPager("inventory", 3, 99, max_rows=max_rows, max_bytes=max_bytes)
    texts, want = [], []
    for count, size in groups:
        rows = [b'"' + bytes([97 + len(want) % 26]) * size + b'"' for _ in range(count)]
        want += rows
        texts += pager.add_group(b",".join(rows), count)
    texts.append(pager.finish())
    frames = [json.loads(t) for t in texts]
    assert all(len(t) <= max_bytes and len(f["rows"]) <= max_rows for t, f in zip(texts, frames))
    assert [r for f in frames for r in f["rows"]] == [json.loads(r) for r in want]


def test_pager_default_limits_are_the_protocols():
    assert (MAX_ROWS, MAX_FRAME_BYTES) == (1000, 256 * 1024)


# -- snapshot then live, while commands race it ----------------------------------------------

USERS = [("alice", "customer"), ("bob", "customer"), ("sam", "staff"), ("audrey", "auditor")]
ACTIONS = st.lists(st.tuples(st.sampled_from(["place", "place", "update", "approve", "ship", "deliver", "cancel",
                                               "restock"]),
                             st.sampled_from(["alice", "bob", "sam"]), st.integers(0, 30), st.integers(1, 3)),
                   min_size=5, max_size=40)


async def act(clients: dict[str, Session], action: tuple, orders: list[str], tag: str) -> None:
    """Run one random command (rejections are fine: they write nothing)."""
    kind, user, pick, quantity = action
    client = clients[user]
    if kind == "place" or not orders:
        order_id = f"{tag}-{len(orders)}"
        data = {"items": [{"sku": random.Random(pick).choice(list(SKUS)), "quantity": quantity}], "note": f"n{pick}"}
        if user == "sam":
            data["customer"] = random.Random(pick).choice(["alice", "bob"])
        reply = await client.command("place_order", order_id, data)
        if reply["type"] == "ack":
            orders.append(order_id)
        return
    order_id = orders[pick % len(orders)]
    if kind == "restock":
        await clients["sam"].command("add_stock", data={"sku": list(SKUS)[pick % 3], "quantity": quantity})
    elif kind == "update":
        await client.command("update_order", order_id, {"ship_to": f"street {pick}"})
    elif kind == "cancel":
        await client.command("cancel_order", order_id, {"reason": "r"})
    else:
        await clients["sam"].command(f"{kind}_order", order_id)


async def run_race_example(url: str, db: str, tag: str, actions: list, snapshot_at: list[int]) -> None:
    async with session(url, "sam", "staff") as sam, session(url, "alice") as alice, session(url, "bob") as bob, \
            contextlib.AsyncExitStack() as stack:
        clients = {"alice": alice, "bob": bob, "sam": sam}
        orders: list[str] = []
        # A few orders first, so that the order:<id> channel has one and pages are several.
        for action in actions[:3]:
            await act(clients, ("place",) + action[1:], orders, tag)
        followers: list[Follower] = []

        async def commands() -> None:
            for action in actions:
                await act(clients, action, orders, tag)

        # Each on its own connection (a Follower reads every frame of its connection).
        channels = [("orders", "alice", "customer"), ("orders", "sam", "staff"), ("inventory", "bob", "customer"),
                    ("orders", "audrey", "auditor"), (f"order:{orders[0]}", "sam", "staff"),
                    ("inventory", "audrey", "auditor")]
        connections = [await stack.enter_async_context(session(url, user, role)) for _, user, role in channels]

        async def snapshots() -> None:
            for pause, client, (channel, user, role) in zip(snapshot_at, connections, channels):
                await trio.sleep(pause / 1000)
                follower = Follower(client, channel, user, role)
                await follower.start()
                followers.append(follower)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commands)
            nursery.start_soon(snapshots)
        head = (await sam.ping())["head"]
        truth = await trio.to_thread.run_sync(log_fold, db, head)
        for follower in followers:
            target = last_visible(db, follower.channel, follower.user, follower.role, follower.seq, head)
            await follower.follow_until(target)
            assert follower.shapes() == visible(follower.channel, follower.user, follower.role, truth), follower.channel
        # ... which is what `get` says, and what the projection tables hold.
        for order_id, order in truth.orders.items():
            assert (await sam.request({"type": "get", "order_id": order_id}))["order"] == order.to_json()
        store = open_store(db, readonly=True)
        try:
            assert store.stored_projections() == truth
        finally:
            store.close()


async def test_snapshot_then_live_folds_to_the_log_while_commands_race(tmp_path):
    """Random commands from several users commit while snapshots of every channel and role are
    taken (pages of 2 rows, so later pages meet rows changed after N): folding the rows and then
    the events gives the log's fold at the end, for every row; no event <= N comes after a
    snapshot at N and none > N is missing (each `prev` is the last seq held)."""
    counter = itertools.count()
    db = str(tmp_path / "race.db")
    async with running_server(tmp_path, db=db, snapshot_page=2, **UNLIMITED) as (url, _, _):
        async with session(url, "sam", "staff") as sam:
            await stock_up(sam, SKUS)

        @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        @given(actions=ACTIONS, snapshot_at=st.lists(st.integers(0, 20), min_size=6, max_size=6))
        def check(actions, snapshot_at) -> None:
            trio.from_thread.run(run_race_example, url, db, f"x{next(counter)}", actions, snapshot_at)

        await trio.to_thread.run_sync(check)


# -- requests that are refused, isolation, frame limits ----------------------------------------


@pytest.fixture
async def server(tmp_path):
    async with running_server(tmp_path, **UNLIMITED) as running:
        yield running


async def test_snapshot_with_since_is_bad_request_and_unknown_order_not_found(server):
    """snapshot + since is a bad_request; a snapshot of an order nobody placed is not_found; a
    refused snapshot leaves the open subscription as it was."""
    url, _, _ = server
    async with session(url, "sam", "staff") as sam:
        reply = await sam.request({"type": "subscribe", "channel": "orders", "snapshot": True, "since": 0})
        assert (reply["type"], reply["code"]) == ("error", "bad_request")
        reply = await sam.request({"type": "subscribe", "channel": "orders", "snapshot": "yes"})
        assert (reply["type"], reply["code"]) == ("error", "bad_request")
        reply = await sam.request({"type": "subscribe", "channel": "order:nobody", "snapshot": True})
        assert (reply["type"], reply["code"]) == ("error", "not_found")
        # An empty log: one frame, no rows, total 0, seq 0.
        subscribed, frames, rows = await take_snapshot(sam, "inventory")
        assert (subscribed["since"], subscribed["head"]) == (0, 0)
        assert frames == [{"type": "snapshot", "channel": "inventory", "seq": 0, "total": 0, "rows": [], "last": True}]
        await sam.live("inventory")


async def test_customer_snapshot_holds_only_its_own_orders(server):
    """A customer's `orders` snapshot has its own orders only; another customer's order:<id> is
    not_found; `inventory` shows every sku to everyone."""
    url, _, _ = server
    async with session(url, "sam", "staff") as sam, session(url, "alice") as alice, session(url, "bob") as bob:
        await stock_up(sam, SKUS)
        for i in range(5):
            await alice.ok("place_order", f"a-{i}", {"items": [{"sku": "cat-food", "quantity": 1}]})
            await bob.ok("place_order", f"b-{i}", {"items": [{"sku": "dog-bed", "quantity": 1}]})
        await sam.ok("place_order", "s-1", {"items": [{"sku": "fish-net", "quantity": 1}], "customer": "alice"})
        _, _, rows = await take_snapshot(alice, "orders")
        assert [r["order_id"] for r in rows] == ["a-0", "a-1", "a-2", "a-3", "a-4", "s-1"]
        assert {r["customer"] for r in rows} == {"alice"}
        reply = await alice.request({"type": "subscribe", "channel": "order:b-0", "snapshot": True})
        assert (reply["type"], reply["code"]) == ("error", "not_found")
        _, _, rows = await take_snapshot(bob, "inventory")
        assert [r["sku"] for r in rows] == sorted(SKUS)
        _, _, rows = await take_snapshot(sam, "orders")
        assert len(rows) == 11


async def test_snapshot_frames_keep_to_1000_rows_and_256_kib(tmp_path):
    """Many small orders make frames of 1,000 rows; big orders make frames of <= 256 KiB; either
    way every row comes exactly once."""
    async with running_server(tmp_path, **UNLIMITED) as (url, _, _):
        async with session(url, "sam", "staff") as sam:
            skus = {f"sku-{i:02d}-" + "x" * 56: 10**6 for i in range(100)}
            await stock_up(sam, {**skus, "a": 10**6})
            for start in range(0, 2500, 500):
                for i in range(start, start + 500):
                    await sam.send({"type": "command", "id": f"p{i}", "name": "place_order", "order_id": f"o-{i:05d}",
                                    "data": {"items": [{"sku": "a", "quantity": 1}]}})
                await sam.until(lambda f: f.get("id") == f"p{start + 499}", timeout=30)
            big = {"items": [{"sku": s, "quantity": 1} for s in skus], "note": "\u00e9\n" * 500}
            for i in range(40):
                await sam.ok("place_order", f"z-{i:02d}", big)
            async with session(url, "sam", "staff") as fresh:
                request_id = next_id()
                await fresh.send({"type": "subscribe", "id": request_id, "channel": "orders", "snapshot": True})
                texts = []
                with trio.fail_after(30):
                    while True:
                        text = await fresh.ws.get_message()
                        message = json.loads(text)
                        if message["type"] == "snapshot":
                            texts.append(text)
                            if message["last"]:
                                break
        frames = [json.loads(t) for t in texts]
        sizes = [len(t.encode()) for t in texts]
        assert all(len(f["rows"]) <= 1000 for f in frames) and max(sizes) <= 256 * 1024
        assert any(len(f["rows"]) == 1000 for f in frames) and max(sizes) > 200 * 1024
        keys = [r["order_id"] for f in frames for r in f["rows"]]
        assert len(keys) == 2540 == frames[0]["total"] and keys == sorted(set(keys))


# -- state as of a seq -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def as_of_log(tmp_path_factory) -> tuple[str, int]:
    """A small log with every kind of event, written by the real server once for this module."""
    path = tmp_path_factory.mktemp("asof") / "asof.db"

    async def write() -> None:
        async with running_server(path.parent, db=path, **UNLIMITED) as (url, _, _):
            async with session(url, "sam", "staff") as sam, session(url, "alice") as alice:
                await stock_up(sam, SKUS)
                rng = random.Random(5)
                for i in range(25):
                    who = alice if i % 2 else sam
                    await who.command("place_order", f"o-{i}", {"items": [{"sku": rng.choice(list(SKUS)), "quantity": 2}],
                                                             **({} if who is alice else {"customer": "bob"})})
                    target = f"o-{rng.randrange(i + 1)}"
                    name = rng.choice(["approve_order", "ship_order", "deliver_order", "cancel_order", "update_order"])
                    await sam.command(name, target, {"note": f"v{i}"} if name == "update_order" else {})
                    if i % 7 == 0:
                        await sam.command("add_stock", data={"sku": rng.choice(list(SKUS)), "quantity": 5, "name": f"N{i}"})

    trio.run(write)
    store = Store.open(str(path), readonly=True)
    head = store.head()
    store.close()
    return str(path), head


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_get_as_of_equals_a_fold_of_the_log_prefix(as_of_log, tmp_path_factory, data):
    """`get` with `as_of` answers exactly the fold of the log up to that seq, for every order and
    sku, whoever asks (not_found where it did not exist then, or is not the customer's)."""
    db, head = as_of_log
    seqs = data.draw(st.lists(st.integers(0, head), min_size=1, max_size=4))

    async def check() -> None:
        async with running_server(tmp_path_factory.mktemp("srv"), db=db) as (url, _, _):
            async with session(url, "audrey", "auditor") as audrey, session(url, "alice") as alice:
                for seq in seqs:
                    truth = log_fold(db, seq)
                    for i in range(25):
                        for who, role in ((audrey, "auditor"), (alice, "customer")):
                            reply = await who.request({"type": "get", "order_id": f"o-{i}", "as_of": seq})
                            order = truth.orders.get(f"o-{i}")
                            if order is None or (role == "customer" and order.customer != "alice"):
                                assert (reply["type"], reply["code"]) == ("error", "not_found"), reply
                            else:
                                assert reply["order"] == order.to_json()
                    for sku in SKUS:
                        reply = await alice.request({"type": "get", "sku": sku, "as_of": seq})
                        stock = truth.stock.get(sku)
                        assert reply.get("stock") == (stock.to_json() if stock else None), reply
                reply = await audrey.request({"type": "get", "sku": "cat-food", "as_of": head + 1})
                assert (reply["type"], reply["code"]) == ("error", "bad_request")

    trio.run(check)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_state_cli_equals_a_fold_of_the_log_prefix(as_of_log, cli, data):
    """`orderlog state --at SEQ` prints the fold of the log up to SEQ, in every format, whole or
    for one order or sku."""
    db, head = as_of_log
    seq = data.draw(st.integers(0, head))
    truth = log_fold(db, seq)
    done = cli("state", "--db", db, "--at", seq)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    want = [{"order": o.to_json()} for _, o in sorted(truth.orders.items())]
    want += [{"stock": s.to_json()} for _, s in sorted(truth.stock.items())]
    assert lines == want
    order_id = data.draw(st.sampled_from([f"o-{i}" for i in range(25)]))
    done = cli("state", "--db", db, "--at", seq, "--order", order_id, "--format", "csv")
    if order_id in truth.orders:
        assert done.returncode == 0, done.stderr
        rows = list(csv.DictReader(io.StringIO(done.stdout)))
        assert len(rows) == 1 and rows[0]["status"] == truth.orders[order_id].status
        assert int(rows[0]["version"]) == truth.orders[order_id].version
    else:
        assert done.returncode == 1 and "not found" in done.stderr
    done = cli("state", "--db", db, "--at", seq, "--sku", "cat-food", "--format", "table")
    if "cat-food" in truth.stock:
        assert str(truth.stock["cat-food"].available) in done.stdout


def test_state_cli_refuses_a_seq_beyond_the_head(as_of_log, cli):
    db, head = as_of_log
    done = cli("state", "--db", db, "--at", head + 1)
    assert done.returncode == 2 and "beyond the head" in done.stderr


# -- encoding, slow clients -------------------------------------------------------------------


async def test_snapshot_rows_are_what_get_returns_whatever_the_text(server):
    """The rows SQLite encodes equal `get`'s shapes (and row_json, the plain twin), for quotes,
    backslashes, control characters and non-ASCII in every free-text field."""
    url, _, _ = server
    odd = 'q"b\\s\n\t\x01 \u00e9\u4e2d\U0001f600 </script> %s%d%%'
    async with session(url, "sam", "staff") as sam, session(url, odd) as odd_customer:
        await sam.ok("add_stock", data={"sku": "s.1", "quantity": 3, "name": odd})
        await sam.ok("add_stock", data={"sku": "s_2", "quantity": 3})
        await odd_customer.ok("place_order", "o.1", {"items": [{"sku": "s.1", "quantity": 1}, {"sku": "s_2", "quantity": 2}],
                                                     "ship_to": odd, "note": odd})
        _, _, rows = await take_snapshot(sam, "orders")
        assert rows == [(await sam.request({"type": "get", "order_id": "o.1"}))["order"]]
        assert json.loads(row_json(order_of(rows[0]))) == rows[0]
        _, _, rows = await take_snapshot(sam, "inventory")
        assert rows == [(await sam.request({"type": "get", "sku": s}))["stock"] for s in ("s.1", "s_2")]


async def test_a_client_that_stops_reading_a_snapshot_stalls_nobody(tmp_path):
    """A client that does not read its snapshot holds no transaction: others' commands are acked,
    other snapshots and `get` answer; when it reads again, its snapshot and feed are complete."""
    from wsclient import raw_connection, token

    async with running_server(tmp_path, snapshot_page=50, **UNLIMITED) as (url, _, _):
        async with session(url, "sam", "staff") as sam:
            await stock_up(sam, {"cat-food": 10**6})
            for start in range(0, 3000, 500):
                for i in range(start, start + 500):
                    await sam.send({"type": "command", "id": f"p{i}", "name": "place_order", "order_id": f"o-{i:05d}",
                                    "data": {"items": [{"sku": "cat-food", "quantity": 1}], "note": "n" * 200}})
                await sam.until(lambda f: f.get("id") == f"p{start + 499}", timeout=30)
            async with raw_connection(url, token("slow", "staff"), rcvbuf=4096, queue=1) as (ws, _):
                await ws.send_message(json.dumps({"type": "subscribe", "id": "s", "channel": "orders", "snapshot": True}))
                await trio.sleep(0.5)  # it reads nothing meanwhile
                for i in range(50):
                    await sam.ok("approve_order", f"o-{i:05d}")
                async with session(url, "other", "staff") as other:
                    _, _, rows = await take_snapshot(other, "orders", timeout=30)
                    assert len(rows) == 3000
                messages = []
                with trio.fail_after(30):
                    while not (messages and messages[-1]["type"] == "live"):
                        messages.append(json.loads(await ws.get_message()))
        snapshot = [m for m in messages if m["type"] == "snapshot"]
        rows = [r for m in snapshot for r in m["rows"]]
        assert len(rows) == 3000 and all(r["status"] == "placed" for r in rows)  # as of N, before the approvals
        events = [m for m in messages if m["type"] == "order-approved"]
        assert [e["stream"] for e in events] == [f"order:o-{i:05d}" for i in range(50)]
        assert events[0]["prev"] == snapshot[0]["seq"]
