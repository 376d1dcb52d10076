"""Redacted events over real sockets: a customer reading stock moves learns nothing that identifies
another customer, and cannot test a guess of another customer's order id (docs/protocol.md section 4).

The attack this pins down: the inventory feed gave a customer other customers' user ids
(`actor`), command ids and the `hash` of the full event, from which a guessable order id was
recovered by trying candidates until the hash matched.
"""

from __future__ import annotations

import json

import trio

from test_feed import query_all
from wsclient import EVENT_TYPES, redacted, running_server, session, stock_up, token

ALICE = "alice-7f3a"
ITEMS = {"items": [{"sku": "kibble", "quantity": 2}, {"sku": "toy", "quantity": 1}]}


async def test_a_customer_cannot_learn_who_placed_other_orders_nor_test_a_guess(tmp_path):
    """Bob's inventory feed (live from the window, and replayed from SQLite) carries Alice's
    stock moves redacted: no actor, command id, hash or order id anywhere in any frame Bob gets,
    while Bob's own moves and staff's restocks come whole."""
    async with running_server(tmp_path, window=1) as (url, _, _):  # a window of 1: replays read SQLite
        async with session(url, "staff-1", "staff") as staff, session(url, "bob") as bob:
            await stock_up(staff, {"kibble": 100, "toy": 100})
            assert (await bob.subscribe("inventory", since=0))["type"] == "subscribed"
            async with session(url, ALICE) as alice:
                await alice.ok("place_order", "alice-order-1", ITEMS, command_id="alice-cmd-place-1")
                await alice.ok("place_order", "alice-order-2", ITEMS, command_id="alice-cmd-place-2")
                await alice.ok("cancel_order", "alice-order-2", command_id="alice-cmd-cancel-2")
            await staff.ok("approve_order", "alice-order-1")
            await staff.ok("ship_order", "alice-order-1")
            await bob.ok("place_order", "bob-order-1", ITEMS)
            log = await query_all(staff)
            head = log[-1]["seq"]
            moves = [e for e in log if e["stream"].startswith("sku:")]
            live = await bob.until(lambda f: f.get("channel") == "inventory" and f.get("seq") == moves[-1]["seq"], 10)
            async with session(url, "bob") as again:
                assert (await again.subscribe("inventory", since=0))["type"] == "subscribed"
                replayed = await again.until(lambda f: f["type"] == "live", 10)
            frames = live + replayed
    alices = {e["seq"] for e in log if e["data"].get("order_id", "").startswith("alice-")}
    for source in (live, replayed):
        got = [{k: v for k, v in f.items() if k not in ("channel", "prev")} for f in source if f["type"] in EVENT_TYPES]
        assert got == [redacted(e) if e["seq"] in alices else e for e in moves]
    text = json.dumps(frames)
    secrets = {ALICE, "alice-order-1", "alice-order-2", "alice-cmd-place-1", "alice-cmd-place-2", "alice-cmd-cancel-2"}
    secrets |= {e["hash"] for e in log if e["seq"] in alices or e["stream"].startswith("order:alice-")}
    assert [s for s in secrets if s in text] == []
    assert any(f.get("redacted") is True for f in frames)
    assert all("redacted" not in f for f in frames if f.get("seq") not in alices)


async def test_a_refresh_to_customer_redacts_at_once_while_others_write(tmp_path):
    """A staff connection refreshed to a customer's token, with many `order:` channels open (each
    checked with a read after the refresh) and another customer writing all along: every stock
    move of the other customer after the `welcome` reaches it redacted, none whole, and the other
    customer's `order:` channels close without another event."""
    async with running_server(tmp_path, rate_limit=1e9, rate_burst=10**9, user_rate_limit=1e9) as (url, _, _):
        async with session(url, "staff-1", "staff") as staff, session(url, "u1", "staff") as user, \
                session(url, "bob") as bob:
            await stock_up(staff, {"kibble": 100_000})
            for i in range(15):
                await bob.ok("place_order", f"bob-{i}", {"items": [{"sku": "kibble", "quantity": 1}]})
                await user.subscribe(f"order:bob-{i}")
            await user.subscribe("inventory")
            await user.live("inventory")
            done = trio.Event()

            async def keep_ordering() -> None:
                i = 0
                while not done.is_set():
                    await bob.ok("place_order", f"bob-more-{i}", {"items": [{"sku": "kibble", "quantity": 1}]})
                    i += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_ordering)
                await trio.sleep(0.05)
                user.inbox.clear()
                await user.send({"type": "auth", "token": token("u1", "customer"), "id": "refresh"})
                frames = await user.until(lambda f: f.get("id") == "refresh", 10)
                assert frames[-1]["role"] == "customer"  # what came before it was the staff's
                moves = 0
                after: list[dict] = []
                with trio.move_on_after(5):
                    while moves < 40:  # bob's moves after the welcome, while bob goes on ordering
                        after.append(await user.recv(5))
                        moves += after[-1].get("channel") == "inventory" and after[-1]["type"] in EVENT_TYPES
                done.set()
    assert moves == 40
    whole = [f for f in after if f.get("channel") == "inventory" and f["type"] in EVENT_TYPES
             and not f.get("redacted") and f["data"].get("order_id", "").startswith("bob-")]
    assert whole == []
    assert [f for f in after if f.get("stream", "").startswith("order:bob-")] == []
    assert sorted(f["channel"] for f in after if f["type"] == "unsubscribed") == sorted(f"order:bob-{i}" for i in range(15))
