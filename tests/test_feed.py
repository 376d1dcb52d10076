"""The live feed over real sockets (docs/protocol.md sections 2 and 3): subscribed/live/prev, resync,
replacing and refused subscriptions, channel rules and isolation between customers, resume
after abrupt disconnects (a hypothesis property), and a stalled subscriber.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time

import pytest
import trio
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from wsclient import (
    EVENT_TYPES,
    TIMEOUT,
    Session,
    assert_quiet,
    decode,
    next_id,
    raw_connection,
    recv_json,
    redacted,
    running_server,
    send_json,
    session,
    stock_up,
    token,
)

FEED_KEYS = {"type", "channel", "seq", "prev", "stream", "version", "at", "actor", "command_id", "data", "hash"}
UNLIMITED = {"rate_limit": 1e9, "rate_burst": 10**9, "user_rate_limit": 1e9, "user_replay_rate": 1e9}


@pytest.fixture
async def server(tmp_path):
    """A running server with default settings."""
    async with running_server(tmp_path) as running:
        yield running


def assert_chain(events: list[dict], since: int) -> None:
    """Each event's prev is the previous event's seq (the first one's is `since`); seqs increase."""
    last = since
    for event in events:
        assert event["prev"] == last, (event["seq"], event["prev"], last)
        assert event["seq"] > last
        last = event["seq"]


def as_event(frame: dict) -> dict:
    """A feed frame as the EVENT object of `result` (without channel and prev)."""
    return {k: v for k, v in frame.items() if k not in ("channel", "prev")}


async def query_all(client: Session, **filt) -> list[dict]:
    """Every event matching `filt`, paging with `next`."""
    events: list[dict] = []
    after = filt.pop("after", 0)
    while True:
        reply = await client.request({"type": "query", "filter": {**filt, "after": after}, "limit": 1000})
        assert reply["type"] == "result", reply
        events.extend(reply["events"])
        if reply["next"] is None:
            return events
        after = reply["next"]


async def small_history(url: str) -> None:
    """Two customers' orders with stock moves, approvals, a shipment and a cancellation."""
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, session(url, "bob") as bob:
        await stock_up(staff, {"kibble": 100, "toy": 100})
        await alice.ok("place_order", "a1", {"items": [{"sku": "kibble", "quantity": 1}, {"sku": "toy", "quantity": 2}]})
        await bob.ok("place_order", "b1", {"items": [{"sku": "kibble", "quantity": 3}]})
        await staff.ok("approve_order", "a1")
        await staff.ok("ship_order", "a1", {"carrier": "UPS"})
        await bob.ok("cancel_order", "b1")


# -- subscribed, events, live ------------------------------------------------------------------


async def test_subscribed_reply_and_since_defaults_to_head(server):
    """`subscribed {channel, since, head}`: since is the request's, or head when omitted."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "staff-1", "staff") as staff:
        head = staff.welcome["head"]
        reply = await staff.request({"type": "subscribe", "channel": "orders", "id": "s1"})
        assert reply == {"type": "subscribed", "id": "s1", "channel": "orders", "since": head, "head": head}
        reply = await staff.request({"type": "subscribe", "channel": "inventory", "since": 3, "id": "s2"})
        assert reply == {"type": "subscribed", "id": "s2", "channel": "inventory", "since": 3, "head": head}
        reply = await staff.request({"type": "subscribe", "channel": "order:a1", "since": head, "id": "s3"})
        assert reply == {"type": "subscribed", "id": "s3", "channel": "order:a1", "since": head, "head": head}


async def test_replay_then_live_then_new_events(server):
    """A subscription replays every visible event after since with a prev chain, sends `live` once, then streams."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "staff-1", "staff") as staff:
        log = await query_all(staff)
        head = staff.welcome["head"]
        for channel, prefix in (("orders", "order:"), ("inventory", "sku:")):
            sub = await staff.subscribe(channel, since=2)
            replay, live = await staff.live(channel)
            assert all(set(e) == FEED_KEYS and e["channel"] == channel for e in replay)
            assert [as_event(e) for e in replay] == [e for e in log if e["seq"] > 2 and e["stream"].startswith(prefix)]
            assert_chain(replay, 2)
            assert live == {"type": "live", "channel": channel, "seq": live["seq"]}
            assert live["seq"] >= sub["head"] == head and live["seq"] >= replay[-1]["seq"]
        ack = await staff.ok("place_order", "s1", {"items": [{"sku": "toy", "quantity": 1}]})
        frames = []
        with trio.fail_after(TIMEOUT):
            while len([f for f in frames if f["type"] in EVENT_TYPES]) < 2:
                frames.append(await staff.recv())
        orders = [f for f in frames if f.get("channel") == "orders"]
        stock = [f for f in frames if f.get("channel") == "inventory"]
        assert [(f["type"], f["seq"], f["prev"]) for f in orders] == [("order-created", ack["seq"] - 1, replay_last(log, "order:"))]
        assert [(f["type"], f["seq"], f["prev"]) for f in stock] == [("stock-reserved", ack["seq"], replay_last(log, "sku:"))]
        assert stock[0]["data"] == {"sku": "toy", "quantity": 1, "order_id": "s1"}
        await assert_quiet(staff.ws, 0.2)


def replay_last(log: list[dict], prefix: str) -> int:
    return [e["seq"] for e in log if e["stream"].startswith(prefix)][-1]


async def test_since_omitted_is_live_only_from_head(server):
    """Without since, nothing is replayed: `live` first, and the first event's prev is the head."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "staff-1", "staff") as staff:
        head = staff.welcome["head"]
        sub = await staff.subscribe("orders")
        assert (sub["since"], sub["head"]) == (head, head)
        assert await staff.recv() == {"type": "live", "channel": "orders", "seq": head}
        ack = await staff.ok("place_order", "n1", {"items": [{"sku": "kibble", "quantity": 1}]})
        [event] = await staff.events("orders", 1)
        assert (event["seq"], event["prev"]) == (ack["seq"] - 1, head)


async def test_live_marker_under_concurrent_appends(tmp_path):
    """While events are appended during the replay, `live` comes once, after every event up to its seq."""
    async with running_server(tmp_path, **UNLIMITED) as (url, _, _):
        async with session(url, "staff-w", "staff") as writer, session(url, "staff-r", "staff") as reader:
            await stock_up(writer, {f"sku{i}": 100_000 for i in range(4)})
            for i in range(100):
                await writer.send({"type": "command", "id": f"pre-{i}", "name": "place_order", "order_id": f"pre-{i}",
                                   "data": {"items": [{"sku": f"sku{j}", "quantity": 1} for j in range(4)]}})
            for i in range(100):
                assert (await writer.reply_to(f"pre-{i}"))["type"] == "ack"
            done = trio.Event()

            async def keep_writing() -> None:
                i = 0
                while not done.is_set() or i < 50:
                    await writer.ok("place_order", f"live-{i}", {"items": [{"sku": "sku0", "quantity": 1}]})
                    i += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_writing)
                await trio.sleep(0.02)
                subs = {}
                for channel in ("orders", "inventory"):
                    subs[channel] = await reader.subscribe(channel, since=0)
                frames: list[dict] = []
                for channel in ("inventory", "orders"):
                    if not any(f["type"] == "live" and f["channel"] == channel for f in frames):
                        frames += await reader.until(lambda f, c=channel: f["type"] == "live" and f["channel"] == c, 20)
                done.set()
            head = (await reader.ping())["head"]
            log = await query_all(reader)
            assert log[-1]["seq"] == head
            # read on until both channels reached the head
            rest = []
            for channel, prefix in (("orders", "order:"), ("inventory", "sku:")):
                last_visible = [e["seq"] for e in log if e["stream"].startswith(prefix)][-1]
                have = [f["seq"] for f in frames + rest if f.get("channel") == channel and f["type"] in EVENT_TYPES]
                if not have or have[-1] < last_visible:
                    rest += await reader.until(lambda f, c=channel, s=last_visible: f.get("channel") == c and f.get("seq") == s
                                               and f["type"] in EVENT_TYPES, 20)
            await assert_quiet(reader.ws, 0.3)
            frames += rest + reader.inbox
            for channel, prefix in (("orders", "order:"), ("inventory", "sku:")):
                mine = [f for f in frames if f.get("channel") == channel]
                lives = [i for i, f in enumerate(mine) if f["type"] == "live"]
                assert len(lives) == 1, f"{channel}: {len(lives)} live markers"
                live = mine[lives[0]]
                before = mine[: lives[0]]
                events = [f for f in mine if f["type"] != "live"]
                assert_chain(events, 0)
                assert live["seq"] >= subs[channel]["head"]
                assert all(f["seq"] <= live["seq"] for f in before)
                visible = [e for e in log if e["stream"].startswith(prefix)]
                assert [as_event(f) for f in before] == [e for e in visible if e["seq"] <= live["seq"]]
                assert [as_event(f) for f in events] == visible, channel
            assert any(f["seq"] > subs["orders"]["head"] for f in frames if f.get("channel") == "orders"), \
                "the test appended nothing after subscribing"


# -- resync ------------------------------------------------------------------------------------


async def test_since_beyond_head_or_foreign_log_id_is_resync_required(tmp_path):
    """`since` > head or another log's log_id: `resync_required`, never a partial replay."""
    async with running_server(tmp_path, db=tmp_path / "other.db") as (other_url, _, _):
        async with session(other_url, "x") as other:
            foreign = other.welcome["log_id"]
    async with running_server(tmp_path) as (url, _, _):
        await small_history(url)
        async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice:
            head = staff.welcome["head"]
            log_id = staff.welcome["log_id"]
            for client in (staff, alice):
                for message in (
                    {"type": "subscribe", "channel": "orders", "since": head + 1},
                    {"type": "subscribe", "channel": "inventory", "since": 10**12},
                    {"type": "subscribe", "channel": "orders", "since": 0, "log_id": foreign},
                    {"type": "subscribe", "channel": "orders", "log_id": foreign},
                    {"type": "subscribe", "channel": "order:a1", "since": head + 5},
                    {"type": "subscribe", "channel": "orders", "since": 1, "log_id": ""},
                ):
                    reply = await client.request(message)
                    assert (reply["type"], reply["code"]) == ("error", "resync_required"), (message, reply)
                await assert_quiet(client.ws, 0.2)
            reply = await staff.subscribe("orders", since=head, log_id=log_id)
            assert reply["type"] == "subscribed"
            assert await staff.recv() == {"type": "live", "channel": "orders", "seq": head}


# -- replacing, refusing, unsubscribing -------------------------------------------------------


async def test_second_subscribe_replaces_the_first(server):
    """A second subscribe to an open channel replaces it: one prev chain from the new since, no duplicates."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "staff-1", "staff") as staff:
        head = staff.welcome["head"]
        await staff.subscribe("orders")
        await staff.live("orders")
        ack = await staff.ok("place_order", "r1", {"items": [{"sku": "toy", "quantity": 1}]})
        [first] = await staff.events("orders", 1)
        assert (first["seq"], first["prev"]) == (ack["seq"] - 1, head)
        reply = await staff.subscribe("orders", since=0)
        assert (reply["since"], reply["head"]) == (0, ack["seq"])
        replay, live = await staff.live("orders")
        assert_chain(replay, 0)
        log = await query_all(staff)
        assert [as_event(e) for e in replay] == [e for e in log if e["stream"].startswith("order:")]
        ack2 = await staff.ok("approve_order", "r1")
        later = await staff.events("orders", 1)
        await staff.ping()
        await assert_quiet(staff.ws, 0.3)
        assert [(e["seq"], e["prev"]) for e in later] == [(ack2["seq"], replay[-1]["seq"])]
        assert not [f for f in staff.inbox if f["type"] in EVENT_TYPES or f["type"] == "live"]


async def test_refused_subscribe_leaves_the_open_subscription(server):
    """A refused subscribe (resync, bad request, not found) leaves the open subscription working as before."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "staff-1", "staff") as staff:
        head = staff.welcome["head"]
        await staff.subscribe("orders")
        await staff.live("orders")
        for message, code in (
            ({"type": "subscribe", "channel": "orders", "since": head + 10}, "resync_required"),
            ({"type": "subscribe", "channel": "orders", "log_id": "not-this-log"}, "resync_required"),
            ({"type": "subscribe", "channel": "orders", "since": -1}, "bad_request"),
            ({"type": "subscribe", "channel": "orders", "since": 0, "extra": 1}, "bad_request"),
        ):
            reply = await staff.request(message)
            assert (reply["type"], reply["code"]) == ("error", code), reply
        ack = await staff.ok("place_order", "k1", {"items": [{"sku": "toy", "quantity": 1}]})
        [event] = await staff.events("orders", 1)
        assert (event["seq"], event["prev"]) == (ack["seq"] - 1, head)
        await staff.ping()
        await assert_quiet(staff.ws, 0.2)


async def test_unsubscribe_stops_events(server):
    """After `unsubscribed {channel}` no event of that channel comes; unsubscribing twice still answers."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff:
        await staff.subscribe("inventory", since=0)
        await staff.subscribe("orders", since=0)
        await staff.ok("add_stock", data={"sku": "toy", "quantity": 3})
        await staff.events("inventory", 1)
        for _ in range(2):
            reply = await staff.request({"type": "unsubscribe", "channel": "inventory", "id": "u1"})
            assert reply == {"type": "unsubscribed", "id": "u1", "channel": "inventory"}
        staff.inbox = [f for f in staff.inbox if f.get("channel") != "inventory"]
        ack = await staff.ok("place_order", "q1", {"items": [{"sku": "toy", "quantity": 1}]})
        [event] = await staff.events("orders", 1)
        assert event["seq"] == ack["seq"] - 1
        await staff.ok("add_stock", data={"sku": "toy", "quantity": 1})
        await staff.ping()
        await assert_quiet(staff.ws, 0.3)
        assert not [f for f in staff.inbox if f.get("channel") == "inventory"], staff.inbox


# -- channels ----------------------------------------------------------------------------------


async def test_order_channel_of_unknown_order_is_not_found_for_every_role(server):
    """Subscribing to order:<id> of an order that does not exist (yet) is `not_found` for every role."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, \
            session(url, "audit-1", "auditor") as auditor:
        for client in (staff, alice, auditor):
            for since in (None, 0):
                reply = await client.subscribe("order:later", since=since)
                assert (reply["type"], reply["code"]) == ("error", "not_found"), reply
        await alice.ok("place_order", "later", {"items": [{"sku": "toy", "quantity": 1}]})
        for client in (staff, alice, auditor):
            reply = await client.subscribe("order:later", since=0)
            assert reply["type"] == "subscribed"
            replay, _ = await client.live("order:later")
            assert [e["type"] for e in replay] == ["order-created"]
            assert replay[0]["stream"] == "order:later"


async def test_order_channel_carries_only_that_order(server):
    """`order:<id>` carries that order's stream only (no stock moves, no other order)."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice:
        await alice.subscribe("order:a1", since=0)
        replay, live = await alice.live("order:a1")
        assert [e["type"] for e in replay] == ["order-created", "order-approved", "order-shipped"]
        assert_chain(replay, 0)
        await staff.ok("place_order", "other", {"items": [{"sku": "toy", "quantity": 1}]})
        ack = await staff.ok("deliver_order", "a1")
        [event] = await alice.events("order:a1", 1)
        assert (event["type"], event["seq"], event["prev"], event["version"]) == ("order-delivered", ack["seq"], replay[-1]["seq"], 4)
        await alice.ping()
        await assert_quiet(alice.ws, 0.2)


@pytest.mark.parametrize("channel", [
    "order:", "order:bad id", "order:" + "x" * 65, "order:a/b", "foo", "Orders", "orders:", "orders ",
    "inventory:kibble", "sku:kibble", "order", "", "order:a1:b",
])
async def test_channel_names_are_validated(server, channel):
    """Only orders, inventory and order:<id> (1..64 of [A-Za-z0-9._-]) are channels: others are bad_request."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff:
        for kind in ("subscribe", "unsubscribe"):
            reply = await staff.request({"type": kind, "channel": channel})
            assert (reply["type"], reply["code"]) == ("error", "bad_request"), reply


async def test_subscription_cap_answers_rate_limited(tmp_path):
    """With max_subscriptions=2 a third distinct channel is `rate_limited`; replacing an open one is fine."""
    async with running_server(tmp_path, max_subscriptions=2) as (url, _, _):
        await small_history(url)
        async with session(url, "staff-1", "staff") as staff:
            assert (await staff.subscribe("orders"))["type"] == "subscribed"
            assert (await staff.subscribe("inventory"))["type"] == "subscribed"
            reply = await staff.subscribe("order:a1")
            assert (reply["type"], reply["code"]) == ("error", "rate_limited"), reply
            assert (await staff.subscribe("orders", since=0))["type"] == "subscribed"
            assert (await staff.request({"type": "unsubscribe", "channel": "inventory"}))["type"] == "unsubscribed"
            assert (await staff.subscribe("order:a1", since=0))["type"] == "subscribed"
            reply = await staff.subscribe("inventory")
            assert (reply["type"], reply["code"]) == ("error", "rate_limited"), reply


# -- isolation ---------------------------------------------------------------------------------


async def test_customers_see_only_their_own_orders(server):
    """A customer's `orders` (catch-up and live) carries only its orders; `inventory` hides others' order ids."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, \
            session(url, "bob") as bob, session(url, "audit-1", "auditor") as auditor:
        for client in (staff, alice, bob, auditor):
            await client.subscribe("orders", since=0)
            await client.subscribe("inventory", since=0)
        # live traffic of both customers and staff
        await bob.ok("place_order", "b2", {"items": [{"sku": "toy", "quantity": 2}]})
        await alice.ok("place_order", "a2", {"items": [{"sku": "kibble", "quantity": 1}]})
        await staff.ok("place_order", "b3", {"items": [{"sku": "toy", "quantity": 1}], "customer": "bob"})
        await staff.ok("approve_order", "b2")
        await staff.ok("ship_order", "b2")
        await alice.ok("cancel_order", "a2")
        await staff.ok("cancel_order", "b3")
        await staff.ok("add_stock", data={"sku": "toy", "quantity": 1})
        log = await query_all(staff)
        head = log[-1]["seq"]
        owner = {}
        for e in log:
            if e["type"] == "order-created":
                owner[e["stream"][6:]] = e["data"]["customer"]

        async def feed(client: Session, channel: str) -> list[dict]:
            frames = await client.until(lambda f: f.get("channel") == channel and f["type"] in EVENT_TYPES
                                        and f["seq"] == last_seq(channel), 10)
            kept = [f for f in frames if f.get("channel") != channel]
            events = [f for f in frames if f.get("channel") == channel and f["type"] in EVENT_TYPES]
            client.inbox[:0] = kept
            return events

        def last_seq(channel: str) -> int:
            prefix = "order:" if channel == "orders" else "sku:"
            return [e["seq"] for e in log if e["stream"].startswith(prefix)][-1]

        all_orders = [e for e in log if e["stream"].startswith("order:")]
        all_stock = [e for e in log if e["stream"].startswith("sku:")]
        for client in (staff, auditor):
            got = await feed(client, "orders")
            assert [as_event(f) for f in got] == all_orders
            got = await feed(client, "inventory")
            assert [as_event(f) for f in got] == all_stock
        for client, user in ((alice, "alice"), (bob, "bob")):
            mine = [e for e in all_orders if owner[e["stream"][6:]] == user]
            orders = [f for f in await feed_upto(client, "orders", mine[-1]["seq"])]
            assert [as_event(f) for f in orders] == mine, user
            assert_chain(orders, 0)
            stock = await feed(client, "inventory")
            assert_chain(stock, 0)
            assert [f["seq"] for f in stock] == [e["seq"] for e in all_stock]
            for frame, event in zip(stock, all_stock):
                order_id = event["data"].get("order_id")
                if order_id is not None and owner[order_id] != user:
                    assert as_event(frame) == redacted(event), (user, frame)
                    assert "order_id" not in frame["data"]
                else:
                    assert as_event(frame) == event
            await client.ping()
            await assert_quiet(client.ws, 0.2)
            leaked = [f for f in client.inbox if f.get("channel") == "orders"]
            assert not leaked, (user, leaked)
        assert head == (await staff.ping())["head"]


async def feed_upto(client: Session, channel: str, seq: int) -> list[dict]:
    """Events of `channel` up to and including `seq` (other frames stay in the inbox)."""
    frames = await client.until(lambda f: f.get("channel") == channel and f["type"] in EVENT_TYPES and f["seq"] >= seq, 10)
    client.inbox[:0] = [f for f in frames if f.get("channel") != channel]
    return [f for f in frames if f.get("channel") == channel and f["type"] in EVENT_TYPES]


# -- resume (property) -------------------------------------------------------------------------

POOL = 8  # order ids per example
SKUS = 3
CUSTOMER_OPS = st.one_of(
    st.tuples(st.just("place"), st.integers(0, POOL - 1), st.integers(0, SKUS - 1), st.integers(1, 3)),
    st.tuples(st.just("cancel"), st.integers(0, POOL - 1)),
)
STAFF_OPS = st.one_of(
    st.tuples(st.just("approve"), st.integers(0, POOL - 1)),
    st.tuples(st.just("ship"), st.integers(0, POOL - 1)),
    st.tuples(st.just("cancel"), st.integers(0, POOL - 1)),
    st.tuples(st.just("add_stock"), st.integers(0, SKUS - 1), st.integers(1, 5)),
    st.tuples(st.just("place"), st.integers(0, POOL - 1), st.integers(0, SKUS - 1), st.integers(1, 3)),
)
SCENARIOS = st.fixed_dictionaries({
    "customers": st.lists(st.lists(CUSTOMER_OPS, max_size=10), min_size=1, max_size=3),
    "staff": st.lists(STAFF_OPS, max_size=14),
    # (events to read before dropping the connection, how to drop it)
    "cuts": st.lists(st.tuples(st.integers(0, 8), st.sampled_from(["tcp", "close"]), st.sampled_from([0, 0.02, 0.05])),
                     max_size=6),
})


BUSY_EXAMPLE = {
    "customers": [[("place", i, i % SKUS, 1) for i in range(c, POOL, 3)] + [("cancel", c)] for c in range(3)],
    "staff": [("add_stock", 0, 5), ("approve", 1), ("ship", 1), ("approve", 2), ("cancel", 2), ("place", 7, 1, 1),
              ("approve", 4), ("ship", 4), ("add_stock", 2, 3), ("cancel", 5)],
    "cuts": [(2, "tcp", 0.05), (0, "tcp", 0), (1, "close", 0.02), (3, "tcp", 0), (1, "tcp", 0.05)],
}


async def run_resume_example(url: str, prefix: str, scenario: dict, stats: dict) -> None:
    order_ids = [f"{prefix}-o{i}" for i in range(POOL)]
    skus = [f"{prefix}-s{j}" for j in range(SKUS)]

    def command(op, who: str) -> tuple[str, str | None, dict | None]:
        kind = op[0]
        if kind == "place":
            return "place_order", order_ids[op[1]], {"items": [{"sku": skus[op[2]], "quantity": op[3]}]}
        if kind == "add_stock":
            return "add_stock", None, {"sku": skus[op[1]], "quantity": op[2]}
        return {"approve": "approve_order", "ship": "ship_order", "cancel": "cancel_order"}[kind], order_ids[op[1]], None

    async with session(url, "staff-setup", "staff") as setup:
        await stock_up(setup, {sku: 6 for sku in skus})
        start = (await setup.ping())["head"]

    writers_done = trio.Event()
    got: list[dict] = []
    last = start
    staff_token = token("staff-reader", "staff")

    async def writer(user: str, role: str, ops: list) -> None:
        async with session(url, user, role) as client:
            for op in ops:
                name, order_id, data = command(op, user)
                reply = await client.command(name, order_id, data)
                assert reply["type"] in ("ack", "error"), reply
                assert reply["type"] == "ack" or reply["code"] in ("not_found", "conflict", "invalid_state",
                                                                   "insufficient_stock"), reply
                await trio.sleep(0.01)  # spread the traffic so that the reader's cuts fall inside it

    async def segment(limit: int | None, mode: str) -> bool:
        """One connection: subscribe from `last`, read, drop. True once `live` came after the writers were done."""
        nonlocal last
        final = writers_done.is_set()
        async with raw_connection(url, staff_token) as (ws, stream):
            welcome = await recv_json(ws)
            assert welcome["type"] == "welcome"
            await send_json(ws, {"type": "subscribe", "channel": "orders", "since": last, "id": "sub"})
            subscribed = None
            lives = 0
            read = 0
            with trio.move_on_after(math.inf if limit is None else 0.3):
                while limit is None or read < limit:
                    frame = await recv_json(ws, timeout=10)
                    if frame["type"] == "subscribed":
                        assert (frame["since"], frame["channel"]) == (last, "orders"), frame
                        subscribed = frame
                    elif frame["type"] == "live":
                        assert subscribed is not None and lives == 0
                        lives += 1
                        assert frame["seq"] >= subscribed["head"] and frame["seq"] >= last
                        if limit is None:
                            return final
                    else:
                        assert frame["type"] in EVENT_TYPES, frame
                        assert subscribed is not None
                        assert frame["prev"] == last, f"prev {frame['prev']} but the last seq held is {last}"
                        assert frame["seq"] > last
                        if read == 0 and last > start:
                            stats["resumed"] += 1  # a resubscription that picked up after events it held
                        got.append(frame)
                        last = frame["seq"]
                        read += 1
            stats[mode] += 1
            if mode == "tcp":
                await stream.aclose()  # abrupt: no close frame
            else:
                with trio.fail_after(TIMEOUT):
                    await ws.aclose()
        return False

    async def reader() -> None:
        for limit, mode, pause in scenario["cuts"]:
            if writers_done.is_set():
                break
            await segment(limit, mode)
            await trio.sleep(pause)  # offline for a while: events pile up behind the last seq held
        while not await segment(None, "close"):
            pass

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with trio.open_nursery() as writers:
                for n, ops in enumerate(scenario["customers"]):
                    writers.start_soon(writer, f"{prefix}-cust{n}", "customer", ops)
                writers.start_soon(writer, f"{prefix}-staff", "staff", scenario["staff"])
            writers_done.set()

    async with session(url, "staff-check", "staff") as checker:
        log = [e for e in await query_all(checker, after=start) if e["stream"].startswith("order:")]
    assert [as_event(f) for f in got] == log
    assert_chain(got, start)


async def test_resume_after_disconnects_gets_exactly_what_was_missed(tmp_path):
    """Reconnecting and resubscribing from the last seq held yields every event exactly once, in order."""
    counter = itertools.count()
    stats = {"resumed": 0, "tcp": 0, "close": 0}
    # A tiny window (at most 2 x 3 events in memory): resuming from an older seq reads from SQLite,
    # a recent one from memory.
    async with running_server(tmp_path, window=3, **UNLIMITED) as (url, _, _):

        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        @given(scenario=SCENARIOS)
        @example(scenario=BUSY_EXAMPLE)
        def check(scenario: dict) -> None:
            trio.from_thread.run(run_resume_example, url, f"x{next(counter)}", scenario, stats)

        await trio.to_thread.run_sync(check)
    # The property must have been exercised: abrupt drops, and resumes after events already held.
    assert stats["tcp"] >= 2 and stats["resumed"] >= 3, stats


# -- stalled subscriber ------------------------------------------------------------------------


NOTE = "n" * 1000
SHIP_TO = "s" * 500


async def append_updates(writer: Session, start: int, count: int, batch: int = 200) -> int:
    """`count` update_order commands on order `big` (about 1.8 KB per event), pipelined; the last ack seq."""
    last = 0
    for b in range(start, start + count, batch):
        ids = [f"upd-{i}" for i in range(b, min(b + batch, start + count))]
        for cid in ids:
            await writer.send({"type": "command", "id": cid, "name": "update_order", "order_id": "big",
                               "data": {"note": NOTE, "ship_to": SHIP_TO}})
        for cid in ids:
            reply = await writer.reply_to(cid, timeout=30)
            assert reply["type"] == "ack", reply
            last = reply["seq"]
    return last


async def ack_latencies(writer: Session, prober: Session, start: int, count: int) -> tuple[list[float], int]:
    """Append `count` events from `writer` while `prober` measures its own commands' ack latency."""
    latencies: list[float] = []
    result = []

    async def write() -> None:
        result.append(await append_updates(writer, start, count))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            while not result or len(latencies) < 20:
                t0 = time.perf_counter()
                await prober.ok("add_stock", data={"sku": "probe", "quantity": 1})
                latencies.append(time.perf_counter() - t0)
    return latencies, result[0]


async def test_stalled_subscriber_slows_nobody_and_catches_up(tmp_path):
    """A subscriber that stops reading does not delay other clients' acks, and later gets every event, no gap."""
    async with running_server(tmp_path, window=200, **UNLIMITED) as (url, _, _):
        async with session(url, "staff-w", "staff") as writer, session(url, "staff-p", "staff") as prober:
            await writer.ok("add_stock", data={"sku": "k", "quantity": 10})
            await writer.ok("place_order", "big", {"items": [{"sku": "k", "quantity": 1}]})
            baseline, _ = await ack_latencies(writer, prober, 0, 1500)

            async with raw_connection(url, token("staff-stalled", "staff"), rcvbuf=8192, queue=1) as (ws, _):
                assert (await recv_json(ws))["type"] == "welcome"
                await send_json(ws, {"type": "subscribe", "channel": "orders", "since": 0, "id": "s"})
                subscribed = await recv_json(ws)
                assert subscribed["type"] == "subscribed"
                # From here on the stalled client reads nothing while about 7 MB of events are appended.
                loaded, last_seq = await ack_latencies(writer, prober, 1500, 4000)
                base50, load50 = statistics.median(baseline), statistics.median(loaded)
                assert load50 < 10 * base50 + 0.05, f"median ack {load50 * 1000:.1f} ms vs {base50 * 1000:.1f} ms baseline"
                # The writer's own acks were not held back either: it finished.
                got: list[dict] = []
                lives = 0
                with trio.fail_after(30):
                    while not got or got[-1]["seq"] < last_seq:
                        frame = decode(await ws.get_message())
                        if frame["type"] == "live":
                            lives += 1
                            assert frame["seq"] >= subscribed["head"]
                            continue
                        assert frame["channel"] == "orders" and frame["type"] in EVENT_TYPES
                        assert frame["prev"] == (got[-1]["seq"] if got else 0), "gap in the stalled client's feed"
                        got.append(frame)
                assert lives == 1
                assert_chain(got, 0)
                log = await query_all(prober, stream="order:big")
                assert [f["seq"] for f in got] == [e["seq"] for e in log]
                assert got[-1] == {**log[-1], "channel": "orders", "prev": got[-2]["seq"]}


async def test_refresh_to_a_customer_token_narrows_open_subscriptions(server):
    """After an in-band refresh that makes the user a customer, its open feeds stop carrying others' orders and ids."""
    url, _, _ = server
    await small_history(url)
    async with session(url, "u1", "staff") as user, session(url, "bob") as bob, \
            session(url, "staff-2", "staff") as staff:
        await bob.ok("place_order", "bob-before", {"items": [{"sku": "toy", "quantity": 1}]})
        for channel in ("orders", "order:bob-before", "inventory"):
            await user.subscribe(channel)
            await user.live(channel)
        welcome = await user.request({"type": "auth", "token": token("u1", "customer")})
        assert (welcome["type"], welcome["role"]) == ("welcome", "customer")
        # The connection is now a customer's: another customer's orders must not reach it.
        await bob.ok("place_order", "bob-after-refresh", {"items": [{"sku": "toy", "quantity": 1}]})
        await staff.ok("update_order", "bob-before", {"note": "staff note"})
        own = await user.ok("place_order", "u1-own", {"items": [{"sku": "toy", "quantity": 1}]})
        [event] = await user.events("orders", 1)
        await user.ping()
        await assert_quiet(user.ws, 0.3)
        frames = [event, *user.inbox]
        leaked = [f for f in frames if f.get("stream", "").startswith("order:bob-")
                  or f.get("data", {}).get("order_id", "").startswith("bob-")]
        assert not leaked, f"a customer's feed carried another customer's order: {leaked}"
        assert (event["stream"], event["seq"]) == ("order:u1-own", own["seq"] - 1)
        stock = [f for f in frames if f.get("channel") == "inventory"]
        assert [f["data"].get("order_id") for f in stock] == [None, "u1-own"], stock


async def test_stalled_subscriber_does_not_hold_up_shutdown(tmp_path):
    """With a subscriber that reads nothing and megabytes pending for it, stop still ends the server within 10 s."""
    release = trio.Event()
    held = trio.Event()

    async def stalled(url: str) -> None:
        async with raw_connection(url, token("staff-stalled", "staff"), rcvbuf=8192, queue=1) as (ws, _):
            assert (await recv_json(ws))["type"] == "welcome"
            await send_json(ws, {"type": "subscribe", "channel": "orders", "since": 0})
            held.set()
            await release.wait()

    async with trio.open_nursery() as outer:
        async with running_server(tmp_path, window=200, **UNLIMITED) as (url, _, _):
            outer.start_soon(stalled, url)
            with trio.fail_after(TIMEOUT):
                await held.wait()
            async with session(url, "staff-w", "staff") as writer:
                await writer.ok("add_stock", data={"sku": "k", "quantity": 10})
                await writer.ok("place_order", "big", {"items": [{"sku": "k", "quantity": 1}]})
                await append_updates(writer, 0, 2000)
            stopping = trio.current_time()
        # running_server has set stop and waited for serve() to return.
        elapsed = trio.current_time() - stopping
        release.set()
    assert elapsed < 10, f"shutdown took {elapsed:.1f} s with a stalled client"


async def test_subscribe_again_during_a_long_replay(tmp_path):
    """Resubscribing while the first replay is under way: after the new `subscribed`, one clean chain and one `live`."""
    async with running_server(tmp_path, window=100, **UNLIMITED) as (url, _, _):
        async with session(url, "staff-1", "staff") as staff:
            await staff.ok("add_stock", data={"sku": "k", "quantity": 10})
            await staff.ok("place_order", "big", {"items": [{"sku": "k", "quantity": 1}]})
            last = await append_updates(staff, 0, 1500)
            log = [e for e in await query_all(staff) if e["stream"].startswith("order:")]
            for since_again in (0, 700, last):
                await staff.send({"type": "subscribe", "channel": "orders", "since": 0, "id": "first"})
                await staff.until(lambda f: f["type"] == "order-updated" and f["channel"] == "orders")
                await staff.send({"type": "subscribe", "channel": "orders", "since": since_again, "id": "second"})
                frames = await staff.until(lambda f: f.get("id") == "second", 30)
                assert frames[-1]["type"] == "subscribed"
                first_part = [f for f in frames if f["type"] in EVENT_TYPES]
                assert_chain(first_part, first_part[0]["prev"])
                frames = await staff.until(lambda f: f["type"] == "live", 30)
                events = [f for f in frames if f["type"] in EVENT_TYPES]
                assert_chain(events, since_again)
                assert [as_event(f) for f in events] == [e for e in log if e["seq"] > since_again]
                await staff.ping()
                await assert_quiet(staff.ws, 0.2)
                assert not [f for f in staff.inbox if f["type"] in EVENT_TYPES or f["type"] == "live"], \
                    "frames of the replaced subscription after the new one's live"
                staff.inbox.clear()
                await staff.request({"type": "unsubscribe", "channel": "orders"})


async def test_many_subscribers_under_concurrent_writers_each_get_their_exact_feed(tmp_path):
    """Many customers, staff and an auditor subscribed at different moments while several writers run: each
    receives exactly its visible events (customers: own orders, redacted inventory), chained, with one `live`."""
    async with running_server(tmp_path, **UNLIMITED) as (url, _, _):
        customers = [f"cust-{i}" for i in range(5)]
        async with session(url, "staff-0", "staff") as staff:
            await stock_up(staff, {"kibble": 100_000, "toy": 100_000})
            order_ids: list[str] = []

            async def customer_writer(user: str) -> None:
                async with session(url, user) as client:
                    for i in range(25):
                        order_id = f"{user}-o{i}"
                        await client.ok("place_order", order_id, {"items": [{"sku": "kibble", "quantity": 1},
                                                                            {"sku": "toy", "quantity": 2}]})
                        order_ids.append(order_id)
                        if i % 4 == 3:
                            await client.ok("cancel_order", order_id)

            async def staff_writer() -> None:
                async with session(url, "staff-w", "staff") as client:
                    for _ in range(60):
                        if order_ids:
                            reply = await client.command("approve_order", order_ids[len(order_ids) // 2])
                            assert reply["type"] == "ack" or reply["code"] == "invalid_state", reply
                        await client.ok("add_stock", data={"sku": "toy", "quantity": 1})
                        await trio.sleep(0.002)

            subscribers: list[tuple[Session, str, int]] = []  # client, channel, since

            async def subscriber(user: str, role: str, delay: float, opened: list) -> None:
                await trio.sleep(delay)
                async with session(url, user, role) as client:
                    for channel in ("orders", "inventory"):
                        head = (await client.ping())["head"]
                        since = head // 2
                        reply = await client.subscribe(channel, since=since)
                        assert reply["type"] == "subscribed"
                        subscribers.append((client, channel, since))
                    opened.append(client)
                    await done.wait()
                    await finished.wait()

            done, finished = trio.Event(), trio.Event()
            async with trio.open_nursery() as nursery:
                opened: list = []
                users = [(u, "customer") for u in customers] + [("staff-r", "staff"), ("audit-r", "auditor")]
                for n, (user, role) in enumerate(users):
                    nursery.start_soon(subscriber, user, role, 0.02 * n, opened)
                async with trio.open_nursery() as writers:
                    for user in customers:
                        writers.start_soon(customer_writer, user)
                    writers.start_soon(staff_writer)
                with trio.fail_after(TIMEOUT):
                    while len(opened) < len(users):
                        await trio.sleep(0.01)
                done.set()
                log = await query_all(staff)
                head = log[-1]["seq"]
                owner = {e["stream"][6:]: e["data"]["customer"] for e in log if e["type"] == "order-created"}
                for client, channel, since in subscribers:
                    prefix = "order:" if channel == "orders" else "sku:"
                    user, role = client.welcome["user"], client.welcome["role"]
                    expected = []
                    for e in log:
                        if e["seq"] <= since or not e["stream"].startswith(prefix):
                            continue
                        if role == "customer" and channel == "orders" and owner[e["stream"][6:]] != user:
                            continue
                        order_id = e["data"].get("order_id")
                        if role == "customer" and order_id is not None and owner[order_id] != user:
                            e = redacted(e)
                        expected.append(e)
                    last = expected[-1]["seq"] if expected else None
                    frames = [f for f in client.inbox if f.get("channel") == channel]
                    client.inbox = [f for f in client.inbox if f.get("channel") != channel]
                    if last is not None and not any(f.get("seq") == last and f["type"] in EVENT_TYPES for f in frames):
                        more = await client.until(lambda f, c=channel, s=last: f.get("channel") == c
                                                  and f["type"] in EVENT_TYPES and f["seq"] == s, 20)
                        client.inbox += [f for f in more if f.get("channel") != channel]
                        frames += [f for f in more if f.get("channel") == channel]
                    if not any(f["type"] == "live" for f in frames):
                        more = await client.until(lambda f, c=channel: f.get("channel") == c and f["type"] == "live")
                        client.inbox += [f for f in more if f.get("channel") != channel]
                        frames += [f for f in more if f.get("channel") == channel]
                    events = [f for f in frames if f["type"] in EVENT_TYPES]
                    assert [as_event(f) for f in events] == expected, (user, channel, since)
                    assert_chain(events, since)
                    assert [f["type"] for f in frames].count("live") == 1, (user, channel)
                for client in opened:
                    await client.ping()
                    assert not [f for f in client.inbox if f["type"] in EVENT_TYPES], client.welcome["user"]
                assert head == (await staff.ping())["head"]
                finished.set()


async def test_pipelined_commits_publish_before_they_ack_and_keep_every_order(tmp_path):
    """Staff connections, each subscribed to `inventory`, send bursts of add_stock without waiting
    for replies, so that one batch commits while the one before it is published and acked.
    Each connection gets its acks in the order it sent the commands, the event of every ack
    before the ack itself (published, then acked), and the acks of all connections together
    are the whole log, once each."""
    async with running_server(tmp_path, **UNLIMITED) as (url, _, _):
        per_connection, connections = 60, 6
        seen: dict[str, list[dict]] = {}

        async def burst(n: int) -> None:
            async with session(url, f"staff-{n}", "staff") as client:
                await client.subscribe("inventory", since=0)
                await client.live("inventory")
                ids = [f"b{n}-{i}" for i in range(per_connection)]
                for command_id in ids:  # all sent before any reply is read
                    await client.send({"type": "command", "id": command_id, "name": "add_stock",
                                       "data": {"sku": f"sku-{n}", "quantity": 1}})
                frames = await client.until(lambda f: f.get("id") == ids[-1], timeout=TIMEOUT)
                acks = [f for f in frames if f["type"] == "ack"]
                assert [a["id"] for a in acks] == ids, "acks out of the order the commands were sent"
                events_seen = set()
                for frame in frames:
                    if frame["type"] in EVENT_TYPES:
                        events_seen.add(frame["seq"])
                    elif frame["type"] == "ack":
                        assert frame["seq"] in events_seen, f"ack of seq {frame['seq']} before its event"
                seen[f"staff-{n}"] = acks

        async with trio.open_nursery() as nursery:
            for n in range(connections):
                nursery.start_soon(burst, n)
        seqs = sorted(a["seq"] for acks in seen.values() for a in acks)
        assert seqs == list(range(1, per_connection * connections + 1))
