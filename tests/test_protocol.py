"""Requests and replies of the live service (docs/protocol.md sections 2 and 4) over real sockets:
malformed frames, error codes and their precedence, commands and acks, get, query and paging,
idempotency, rate limiting and shutdown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from orderlog.store import Store
from wsclient import (
    EVENT_TYPES,
    SECRET,
    TIMEOUT,
    Session,
    assert_quiet,
    connect,
    expect_close,
    next_id,
    recv_json,
    running_server,
    send_json,
    session,
    stock_up,
    token,
)

REPO = Path(__file__).resolve().parents[1]
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
EVENT_KEYS = {"type", "seq", "stream", "version", "at", "actor", "command_id", "data", "hash"}


@pytest.fixture
async def server(tmp_path):
    """A running server with default settings."""
    async with running_server(tmp_path) as running:
        yield running


async def expect_error(client: Session, message: dict, code: str) -> dict:
    """Send `message` (with an id); the reply must be `error` `code` echoing the id."""
    reply = await client.request(message)
    assert reply["type"] == "error", (message, reply)
    assert reply["code"] == code, (message, reply)
    assert reply["id"] == (message.get("id") or reply["id"])
    assert isinstance(reply["message"], str) and reply["message"]
    return reply


# -- malformed frames --------------------------------------------------------------------------


async def test_unknown_type_is_unknown_type_with_id_echoed(server):
    """An unknown `type` answers `error unknown_type` echoing the id; the connection stays open."""
    url, _, _ = server
    async with session(url, "alice") as client:
        for kind in ("pong", "subscribe_all", "Ping", "welcome", ""):
            reply = await client.request({"type": kind, "id": "u-1"})
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "unknown_type", "u-1"), reply
        await client.ping()


BAD_FRAMES = {
    "binary": b'{"type":"ping","id":"x"}',
    "not-json": "{type: ping}",
    "truncated": '{"type":"ping"',
    "array": '[{"type":"ping"}]',
    "string": '"ping"',
    "number": "42",
    "null": "null",
    "missing-type": '{"id":"x"}',
    "type-not-string": '{"type":1,"id":"x"}',
    "type-null": '{"type":null}',
    "id-not-string": '{"type":"ping","id":7}',
    "id-empty": '{"type":"ping","id":""}',
    "id-too-long": json.dumps({"type": "ping", "id": "x" * 65}),
    "nan": '{"type":"ping","x":NaN',
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
async def test_malformed_frames_are_bad_request_and_connection_stays_open(server, name):
    """Binary, non-JSON, non-object, missing type or bad id: `error bad_request`, then a ping still works."""
    url, _, _ = server
    async with session(url, "alice") as client:
        with trio.fail_after(TIMEOUT):
            await client.ws.send_message(BAD_FRAMES[name])
        reply = await client.recv()
        assert (reply["type"], reply["code"]) == ("error", "bad_request"), reply
        assert reply.get("id") in (None, "x")
        await client.ping()


async def test_id_of_64_characters_is_accepted(server):
    """A request id of exactly 64 characters is valid and echoed."""
    url, _, _ = server
    async with session(url, "alice") as client:
        reply = await client.request({"type": "ping", "id": "i" * 64})
        assert reply == {"type": "pong", "id": "i" * 64, "head": 0, "head_hash": None}


BAD_REQUESTS = [
    # subscribe
    {"type": "subscribe"},
    {"type": "subscribe", "channel": 5},
    {"type": "subscribe", "channel": None},
    {"type": "subscribe", "channel": "orders", "since": -1},
    {"type": "subscribe", "channel": "orders", "since": "3"},
    {"type": "subscribe", "channel": "orders", "since": 1.5},
    {"type": "subscribe", "channel": "orders", "since": True},
    {"type": "subscribe", "channel": "orders", "log_id": 5},
    {"type": "subscribe", "channel": "orders", "sinse": 3},
    # unsubscribe
    {"type": "unsubscribe"},
    {"type": "unsubscribe", "channel": ["orders"]},
    {"type": "unsubscribe", "channel": "everything"},
    {"type": "unsubscribe", "channel": "orders", "since": 0},
    # command
    {"type": "command", "name": 5},
    {"type": "command"},
    {"type": "command", "name": "approve_order", "order_id": 5},
    {"type": "command", "name": "approve_order", "order_id": "o 1"},
    {"type": "command", "name": "approve_order", "order_id": "x" * 65},
    {"type": "command", "name": "approve_order", "order_id": "o1", "expected_version": -1},
    {"type": "command", "name": "approve_order", "order_id": "o1", "expected_version": "1"},
    {"type": "command", "name": "approve_order", "order_id": "o1", "expected_version": True},
    {"type": "command", "name": "approve_order", "order_id": "o1", "data": []},
    {"type": "command", "name": "approve_order", "order_id": "o1", "data": "x"},
    {"type": "command", "name": "approve_order", "order_id": "o1", "extra": 1},
    {"type": "command", "name": "launch_rocket", "order_id": "o1"},
    {"type": "command", "name": "approve_order"},
    {"type": "command", "name": "approve_order", "order_id": "o1", "data": {"x": 1}},
    {"type": "command", "name": "add_stock", "data": {"sku": "s", "quantity": 0}},
    {"type": "command", "name": "add_stock", "data": {"sku": "s", "quantity": "1"}},
    {"type": "command", "name": "add_stock", "data": {"quantity": 1}},
    {"type": "command", "name": "add_stock", "data": {"sku": "s s", "quantity": 1}},
    {"type": "command", "name": "add_stock", "order_id": "o1", "data": {"sku": "s", "quantity": 1}},
    {"type": "command", "name": "place_order", "order_id": "o1", "data": {}},
    {"type": "command", "name": "place_order", "order_id": "o1", "data": {"items": []}},
    {"type": "command", "name": "place_order", "order_id": "o1", "data": {"items": [{"sku": "s", "quantity": 1001}]}},
    {"type": "command", "name": "place_order", "order_id": "o1", "data": {"items": [{"sku": "s", "quantity": 0}]}},
    {"type": "command", "name": "place_order", "order_id": "o1", "data": {"items": [{"sku": "s"}]}},
    {"type": "command", "name": "place_order", "order_id": "o1",
     "data": {"items": [{"sku": "s", "quantity": 1, "price": 3}]}},
    {"type": "command", "name": "place_order", "order_id": "o1",
     "data": {"items": [{"sku": "s", "quantity": 1}] * 101}},
    {"type": "command", "name": "place_order", "order_id": "o1",
     "data": {"items": [{"sku": "s", "quantity": 1}], "ship_to": 5}},
    {"type": "command", "name": "place_order", "order_id": "o1",
     "data": {"items": [{"sku": "s", "quantity": 1}], "note": ""}},
    {"type": "command", "name": "update_order", "order_id": "o1", "data": {}},
    {"type": "command", "name": "ship_order", "order_id": "o1", "data": {"carrier": 1}},
    {"type": "command", "name": "cancel_order", "order_id": "o1", "data": {"reason": "x" * 501}},
    # get
    {"type": "get"},
    {"type": "get", "order_id": "o1", "sku": "s"},
    {"type": "get", "order_id": 5},
    {"type": "get", "sku": None},
    {"type": "get", "sku": "bad sku"},
    {"type": "get", "order_id": "o1", "extra": True},
    # query
    {"type": "query", "limit": 0},
    {"type": "query", "limit": 1001},
    {"type": "query", "limit": "5"},
    {"type": "query", "limit": 2.5},
    {"type": "query", "filter": []},
    {"type": "query", "filter": {"sequence": 1}},
    {"type": "query", "filter": {"stream": 5}},
    {"type": "query", "filter": {"order_id": ["o1"]}},
    {"type": "query", "filter": {"actor": None}},
    {"type": "query", "filter": {"types": "order-created"}},
    {"type": "query", "filter": {"types": [1]}},
    {"type": "query", "filter": {"after": -1}},
    {"type": "query", "filter": {"after": "3"}},
    {"type": "query", "filter": {"until": 1.5}},
    {"type": "query", "filter": {"from_time": "yesterday"}},
    {"type": "query", "filter": {"from_time": "2026-01-01T00:00:00"}},
    {"type": "query", "filter": {"to_time": "2026-01-01"}},
    {"type": "query", "filter": {"to_time": 1700000000}},
    {"type": "query", "filter": {"from_time": "2026-13-01T00:00:00Z"}},
    {"type": "query", "extra": 1},
    # ping
    {"type": "ping", "extra": 1},
]


@pytest.mark.parametrize("message", BAD_REQUESTS, ids=lambda m: json.dumps(m)[:70])
async def test_schema_violations_are_bad_request(server, message):
    """Missing, mistyped or unknown fields in any request type: `bad_request` with the id echoed."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as client:
        await expect_error(client, {**message, "id": "bad-1"}, "bad_request")
        await client.ping()
        assert (await client.ping())["head"] == 0, "a rejected command must not append"


async def test_oversized_frame_closes_1009(tmp_path):
    """A frame larger than max_message_size closes the connection with 1009; one of exactly that size is fine."""
    async with running_server(tmp_path, max_message_size=1024) as (url, _, _):
        async with session(url, "alice") as client:
            small = '{"type":"ping","id":"small"' + " " * 900 + "}"
            exact = '{"type":"ping","id":"exact"' + " " * (1024 - 28) + "}"
            assert len(exact.encode()) == 1024
            for frame in (small, exact):
                with trio.fail_after(TIMEOUT):
                    await client.ws.send_message(frame)
                assert (await client.recv())["type"] == "pong"
            big = '{"type":"ping","id":"big"' + " " * (1025 - 26) + "}"
            assert len(big.encode()) == 1025
            with trio.fail_after(TIMEOUT):
                await client.ws.send_message(big)
            code, _ = await expect_close(client.ws)
            assert code == 1009


async def test_command_without_id_is_bad_request(server):
    """A `command` needs an id: without one the reply is `bad_request` (and nothing is appended)."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as client:
        await client.send({"type": "command", "name": "add_stock", "data": {"sku": "s", "quantity": 1}})
        reply = await client.recv()
        assert (reply["type"], reply["code"]) == ("error", "bad_request")
        assert "id" not in reply
        assert (await client.ping())["head"] == 0


# -- replies -----------------------------------------------------------------------------------


async def test_every_reply_echoes_the_request_id(server):
    """ping, get, query, subscribe, unsubscribe, command and errors all echo the request's id."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as client:
        ack = await client.command("add_stock", data={"sku": "cat-food", "quantity": 2}, command_id="first")
        assert ack["id"] == "first"
        requests = [
            {"type": "ping"},
            {"type": "command", "name": "add_stock", "data": {"sku": "cat-food", "quantity": 2}},
            {"type": "get", "sku": "cat-food"},
            {"type": "get", "sku": "nothing"},
            {"type": "query", "limit": 1},
            {"type": "subscribe", "channel": "inventory"},
            {"type": "unsubscribe", "channel": "inventory"},
            {"type": "unsubscribe", "channel": "orders"},
            {"type": "command", "name": "approve_order", "order_id": "nope"},
            {"type": "nonsense"},
        ]
        for i, message in enumerate(requests):
            rid = f"id-{i}"
            await client.send({**message, "id": rid})
        seen = []
        with trio.fail_after(TIMEOUT):
            while len(seen) < len(requests):
                frame = await client.recv()
                if frame["type"] != "live" and frame["type"] not in EVENT_TYPES:
                    seen.append(frame)
        assert sorted(f["id"] for f in seen) == sorted(f"id-{i}" for i in range(len(requests)))
        by_id = {f["id"]: f for f in seen}
        assert [by_id[f"id-{i}"]["type"] for i in range(len(requests))] == [
            "pong", "ack", "stock", "error", "result", "subscribed", "unsubscribed", "unsubscribed", "error",
            "error"]
        assert by_id["id-7"] == {"type": "unsubscribed", "id": "id-7", "channel": "orders"}


async def test_pong_carries_the_head(server):
    """`pong {head}` is the seq of the newest committed event."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as client:
        assert (await client.ping())["head"] == 0
        ack = await client.ok("add_stock", data={"sku": "s1", "quantity": 1})
        assert (await client.ping())["head"] == ack["seq"] == 1
        await client.ok("add_stock", data={"sku": "s2", "quantity": 1})
        await client.ok("place_order", "o1", {"items": [{"sku": "s1", "quantity": 1}, {"sku": "s2", "quantity": 1}]})
        assert (await client.ping())["head"] == 5


async def test_requests_without_id_get_replies_without_id(server):
    """A request without an id gets its reply without an id."""
    url, _, _ = server
    async with session(url, "alice") as client:
        await client.send({"type": "ping"})
        assert await client.recv() == {"type": "pong", "head": 0, "head_hash": None}


# -- commands ----------------------------------------------------------------------------------


async def test_every_command_acks_with_seq_version_events_duplicate(server):
    """Each command's ack is {id, seq, version, events, duplicate} for its target stream."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice:
        ack = await staff.command("add_stock", data={"sku": "kibble", "quantity": 10, "name": "Kibble"},
                                  command_id="k1")
        assert ack == {"type": "ack", "id": "k1", "seq": 1, "version": 1, "events": ["stock-added"], "duplicate": False}
        ack = await staff.ok("add_stock", data={"sku": "toy", "quantity": 5})
        assert (ack["seq"], ack["version"], ack["events"]) == (2, 1, ["stock-added"])
        ack = await staff.ok("add_stock", data={"sku": "kibble", "quantity": 5})
        assert (ack["seq"], ack["version"]) == (3, 2)
        ack = await alice.command("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 2},
                                                                  {"sku": "toy", "quantity": 1}],
                                                        "ship_to": "1 Main St"}, command_id="p1")
        assert ack == {"type": "ack", "id": "p1", "seq": 6, "version": 1,
                       "events": ["order-created", "stock-reserved", "stock-reserved"], "duplicate": False}
        ack = await alice.ok("update_order", "o1", {"note": "ring twice"})
        assert (ack["seq"], ack["version"], ack["events"]) == (7, 2, ["order-updated"])
        ack = await staff.ok("approve_order", "o1")
        assert (ack["seq"], ack["version"], ack["events"]) == (8, 3, ["order-approved"])
        ack = await staff.ok("update_order", "o1", {"ship_to": "2 Side St"})
        assert (ack["seq"], ack["version"]) == (9, 4)
        ack = await staff.ok("ship_order", "o1", {"carrier": "UPS", "tracking": "1Z"})
        assert (ack["seq"], ack["version"], ack["events"]) == (12, 5, ["order-shipped", "stock-shipped", "stock-shipped"])
        ack = await staff.ok("deliver_order", "o1")
        assert (ack["seq"], ack["version"], ack["events"]) == (13, 6, ["order-delivered"])
        ack = await alice.ok("place_order", "o2", {"items": [{"sku": "toy", "quantity": 4}]})
        assert (ack["seq"], ack["version"]) == (15, 1)
        ack = await alice.ok("cancel_order", "o2", {"reason": "changed my mind"})
        assert (ack["seq"], ack["version"], ack["events"]) == (17, 2, ["order-cancelled", "stock-released"])
        ack = await staff.ok("place_order", "o3", {"items": [{"sku": "toy", "quantity": 1}], "customer": "bob"})
        assert ack["events"] == ["order-created", "stock-reserved"]
        await staff.ok("approve_order", "o3")
        ack = await staff.ok("cancel_order", "o3")
        assert (ack["version"], ack["events"]) == (3, ["order-cancelled", "stock-released"])
        assert (await staff.ping())["head"] == ack["seq"] == 22
        order = (await staff.request({"type": "get", "order_id": "o3"}))["order"]
        assert (order["customer"], order["status"]) == ("bob", "cancelled")


async def test_duplicate_command_id_replays_the_original_ack(tmp_path):
    """A command id the user already used returns the original ack with duplicate true, even after a restart."""
    db = tmp_path / "log.db"
    async with running_server(tmp_path, db=db) as (url, _, _):
        async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice:
            await staff.ok("add_stock", data={"sku": "kibble", "quantity": 10})
            first = await alice.command("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 2}]},
                                        command_id="same")
            assert first["type"] == "ack" and first["duplicate"] is False
            again = await alice.command("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 2}]},
                                        command_id="same")
            assert again == {**first, "duplicate": True}
            # Another body under the same id is still the original command's ack.
            other = await alice.command("place_order", "o9", {"items": [{"sku": "kibble", "quantity": 1}]},
                                        command_id="same")
            assert other == {**first, "duplicate": True}
            assert (await alice.ping())["head"] == first["seq"] == 3
            # Ids are per user: staff may use "same" for its own command.
            mine = await staff.command("add_stock", data={"sku": "kibble", "quantity": 1}, command_id="same")
            assert mine["type"] == "ack" and mine["duplicate"] is False and mine["seq"] == 4
            # A rejected command is not remembered: its id may be used again.
            refused = await alice.command("approve_order", "o1", command_id="retry-me")
            assert refused["code"] == "forbidden"
            refused = await alice.command("place_order", "o2", {"items": [{"sku": "kibble", "quantity": 99}]},
                                          command_id="retry-me")
            assert refused["code"] == "insufficient_stock"
            accepted = await alice.command("place_order", "o2", {"items": [{"sku": "kibble", "quantity": 1}]},
                                           command_id="retry-me")
            assert accepted["type"] == "ack" and accepted["duplicate"] is False
    async with running_server(tmp_path, db=db) as (url, _, _):
        async with session(url, "alice") as alice:
            again = await alice.command("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 2}]},
                                        command_id="same")
            assert again == {**first, "duplicate": True}
            assert (await alice.ping())["head"] == accepted["seq"]


async def test_expected_version_mismatch_is_conflict_with_current_version(server):
    """A wrong expected_version answers `conflict` with details.current_version (0 for a new stream)."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff:
        reply = await staff.command("add_stock", data={"sku": "s", "quantity": 1}, expected_version=1)
        assert (reply["code"], reply["details"]) == ("conflict", {"current_version": 0})
        await staff.ok("add_stock", data={"sku": "s", "quantity": 5}, expected_version=0)
        await staff.ok("add_stock", data={"sku": "s", "quantity": 5}, expected_version=1)
        await staff.ok("place_order", "o1", {"items": [{"sku": "s", "quantity": 1}]}, expected_version=0)
        reply = await staff.command("approve_order", "o1", expected_version=0)
        assert (reply["code"], reply["details"]) == ("conflict", {"current_version": 1})
        reply = await staff.command("place_order", "o2", {"items": [{"sku": "s", "quantity": 1}]}, expected_version=3)
        assert (reply["code"], reply["details"]) == ("conflict", {"current_version": 0})
        ack = await staff.ok("approve_order", "o1", expected_version=1)
        assert ack["version"] == 2
        assert (await staff.ping())["head"] == ack["seq"]


async def test_insufficient_stock_names_sku_and_available(server):
    """Not enough stock answers `insufficient_stock` with details {sku, available}; nothing is reserved."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice:
        await stock_up(staff, {"kibble": 5, "toy": 2})
        reply = await alice.command("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 5},
                                                                    {"sku": "toy", "quantity": 3}]})
        assert (reply["code"], reply["details"]) == ("insufficient_stock", {"sku": "toy", "available": 2})
        reply = await alice.command("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 3},
                                                                    {"sku": "kibble", "quantity": 3}]})
        assert (reply["code"], reply["details"]) == ("insufficient_stock", {"sku": "kibble", "available": 5})
        reply = await alice.command("place_order", "o1", {"items": [{"sku": "unknown-sku", "quantity": 1}]})
        assert (reply["code"], reply["details"]) == ("insufficient_stock", {"sku": "unknown-sku", "available": 0})
        stock = (await alice.request({"type": "get", "sku": "kibble"}))["stock"]
        assert (stock["available"], stock["reserved"]) == (5, 0)
        assert (await alice.ping())["head"] == 2


async def test_wrong_status_is_invalid_state(server):
    """A transition from the wrong status, or an owner acting too late: `invalid_state`."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice:
        await stock_up(staff, {"kibble": 50})
        await alice.ok("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 1}]})
        for name in ("ship_order", "deliver_order"):
            assert (await staff.command(name, "o1"))["code"] == "invalid_state"
        await staff.ok("approve_order", "o1")
        assert (await staff.command("approve_order", "o1"))["code"] == "invalid_state"
        assert (await alice.command("cancel_order", "o1"))["code"] == "invalid_state"
        assert (await alice.command("update_order", "o1", {"note": "x"}))["code"] == "invalid_state"
        await staff.ok("ship_order", "o1")
        assert (await staff.command("cancel_order", "o1"))["code"] == "invalid_state"
        assert (await staff.command("update_order", "o1", {"note": "x"}))["code"] == "invalid_state"
        await staff.ok("deliver_order", "o1")
        assert (await staff.command("deliver_order", "o1"))["code"] == "invalid_state"
        await alice.ok("place_order", "o2", {"items": [{"sku": "kibble", "quantity": 1}]})
        await alice.ok("cancel_order", "o2")
        for name in ("approve_order", "cancel_order", "ship_order"):
            assert (await staff.command(name, "o2"))["code"] == "invalid_state"


async def test_roles_that_may_never_run_a_command_get_forbidden(server):
    """Auditors run no command; customers no staff command nor place_order for someone else."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, \
            session(url, "audit-1", "auditor") as auditor:
        await stock_up(staff, {"kibble": 50})
        await alice.ok("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 1}]})
        head = (await staff.ping())["head"]
        every = [
            ("add_stock", None, {"sku": "kibble", "quantity": 1}),
            ("place_order", "o-aud", {"items": [{"sku": "kibble", "quantity": 1}]}),
            ("update_order", "o1", {"note": "x"}),
            ("approve_order", "o1", None),
            ("ship_order", "o1", None),
            ("deliver_order", "o1", None),
            ("cancel_order", "o1", None),
        ]
        for name, order_id, data in every:
            assert (await auditor.command(name, order_id, data))["code"] == "forbidden", name
        for name, order_id, data in every:
            if name in ("add_stock", "approve_order", "ship_order", "deliver_order"):
                assert (await alice.command(name, order_id, data))["code"] == "forbidden", name
        reply = await alice.command("place_order", "o-for-bob", {"items": [{"sku": "kibble", "quantity": 1}],
                                                                 "customer": "bob"})
        assert reply["code"] == "forbidden"
        ack = await alice.ok("place_order", "o-self", {"items": [{"sku": "kibble", "quantity": 1}], "customer": "alice"})
        assert (await staff.ping())["head"] == ack["seq"] == head + 2


async def test_error_precedence(server):
    """bad_request before forbidden before not_found before conflict / invalid_state."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, \
            session(url, "audit-1", "auditor") as auditor:
        await stock_up(staff, {"kibble": 5})
        await alice.ok("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 1}]})
        # bad_request beats forbidden
        assert (await auditor.command("approve_order", "o1", {"x": 1}))["code"] == "bad_request"
        assert (await alice.command("approve_order", "nope", {"x": 1}))["code"] == "bad_request"
        assert (await alice.command("add_stock", data={"sku": "s"}))["code"] == "bad_request"
        assert (await alice.request({"type": "query", "limit": 0}))["code"] == "bad_request"
        # forbidden beats not_found (decided before any lookup)
        assert (await alice.command("approve_order", "nope"))["code"] == "forbidden"
        assert (await auditor.command("cancel_order", "nope"))["code"] == "forbidden"
        assert (await alice.request({"type": "query", "filter": {"order_id": "nope"}}))["code"] == "forbidden"
        # not_found beats conflict and invalid_state
        assert (await staff.command("approve_order", "nope", expected_version=7))["code"] == "not_found"
        assert (await staff.command("deliver_order", "nope"))["code"] == "not_found"
        assert (await alice.request({"type": "subscribe", "channel": "order:nope", "since": 10**6}))["code"] == "not_found"
        # conflict (expected_version) beats invalid_state
        reply = await staff.command("deliver_order", "o1", expected_version=5)
        assert (reply["code"], reply["details"]) == ("conflict", {"current_version": 1})
        # conflict of a used id beats insufficient_stock
        reply = await staff.command("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 999}]})
        assert reply["code"] == "conflict"


def _without(text: str, order_id: str) -> str:
    return text.replace(order_id, "<ID>")


async def test_another_customers_order_looks_exactly_like_an_unused_id(server):
    """To a customer, another's order answers not_found like an unused id, the message differing only by id."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, \
            session(url, "bob") as bob:
        await stock_up(staff, {"kibble": 50})
        await bob.ok("place_order", "bobs-order", {"items": [{"sku": "kibble", "quantity": 1}]})
        requests = [
            {"type": "get", "order_id": "{id}"},
            {"type": "subscribe", "channel": "order:{id}"},
            {"type": "subscribe", "channel": "order:{id}", "since": 0},
            {"type": "command", "name": "update_order", "order_id": "{id}", "data": {"note": "mine now"}},
            {"type": "command", "name": "cancel_order", "order_id": "{id}"},
            {"type": "command", "name": "cancel_order", "order_id": "{id}", "expected_version": 1},
            {"type": "command", "name": "update_order", "order_id": "{id}", "data": {"note": "x"},
             "expected_version": 4},
        ]
        for template in requests:
            replies = {}
            for order_id in ("bobs-order", "never-used"):
                message = json.loads(json.dumps(template).replace("{id}", order_id))
                message["id"] = "same-id-" + next_id()
                reply = await alice.request(message)
                assert reply["type"] == "error" and reply["code"] == "not_found", (message, reply)
                reply.pop("id")
                replies[order_id] = json.loads(_without(json.dumps(reply), order_id))
            assert replies["bobs-order"] == replies["never-used"], template
        # Bob still owns an untouched order, and sees it.
        order = (await bob.request({"type": "get", "order_id": "bobs-order"}))["order"]
        assert (order["status"], order["version"], order["note"]) == ("placed", 1, None)


async def test_place_order_with_a_used_id_is_conflict_for_everyone(server):
    """Order ids are global: place_order of a used id is `conflict` for the owner, others and staff."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, \
            session(url, "bob") as bob:
        await stock_up(staff, {"kibble": 50})
        await bob.ok("place_order", "taken", {"items": [{"sku": "kibble", "quantity": 1}]})
        head = (await bob.ping())["head"]
        for client in (alice, bob, staff):
            reply = await client.command("place_order", "taken", {"items": [{"sku": "kibble", "quantity": 1}]})
            assert reply["code"] == "conflict", reply
        assert (await bob.ping())["head"] == head


async def test_flooding_commands_is_rate_limited(tmp_path):
    """Commands beyond rate_burst (then rate_limit per second) answer `rate_limited`; pings are not limited."""
    async with running_server(tmp_path, rate_limit=1, rate_burst=3) as (url, _, _):
        async with session(url, "staff-1", "staff") as staff:
            ids = [f"flood-{i}" for i in range(8)]
            for cid in ids:
                await staff.send({"type": "command", "id": cid, "name": "add_stock",
                                  "data": {"sku": "s", "quantity": 1}})
            replies = [await staff.reply_to(cid) for cid in ids]
            limited = [r for r in replies if r["type"] == "error" and r["code"] == "rate_limited"]
            acked = [r for r in replies if r["type"] == "ack"]
            assert len(acked) + len(limited) == len(ids), replies
            assert 3 <= len(acked) <= 4 and len(limited) >= 4, replies
            assert [r["id"] for r in replies] == ids
            assert (await staff.ping())["head"] == len(acked), "a rate-limited command must not append"
            await trio.sleep(1.2)
            assert (await staff.command("add_stock", data={"sku": "s", "quantity": 1}))["type"] == "ack"


async def test_same_command_id_pipelined_twice_is_applied_once(server):
    """The same command id sent twice back to back (likely one group commit) is applied once; the second is a duplicate."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff:
        for _ in range(2):
            await staff.send({"type": "command", "id": "twice", "name": "add_stock", "data": {"sku": "s", "quantity": 1}})
        first, second = await staff.reply_to("twice"), await staff.reply_to("twice")
        assert sorted([first["duplicate"], second["duplicate"]]) == [False, True], (first, second)
        assert {k: v for k, v in first.items() if k != "duplicate"} == {k: v for k, v in second.items() if k != "duplicate"}
        assert (await staff.ping())["head"] == 1
        stock = (await staff.request({"type": "get", "sku": "s"}))["stock"]
        assert stock["available"] == 1


async def test_concurrent_place_order_of_one_id_acks_exactly_once(server):
    """Two customers placing the same order id at once: one ack, one `conflict`."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, \
            session(url, "bob") as bob:
        await stock_up(staff, {"kibble": 100})
        for round_ in range(5):
            replies = {}

            async def place(client: Session, name: str) -> None:
                replies[name] = await client.command("place_order", f"race-{round_}",
                                                     {"items": [{"sku": "kibble", "quantity": 1}]})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(place, alice, "alice")
                nursery.start_soon(place, bob, "bob")
            kinds = sorted(r["type"] if r["type"] == "ack" else r["code"] for r in replies.values())
            assert kinds == ["ack", "conflict"], replies


# -- strings that are not Unicode text -----------------------------------------------------------
# JSON can spell a lone UTF-16 surrogate ("\ud800"), which no UTF-8 frame can carry back. Such a
# request is malformed: it must get `bad_request` (or at least a reply), never a crash.


async def assert_server_alive(url: str) -> None:
    async with session(url, "someone-else") as other:
        await other.ping()


async def test_lone_surrogate_in_request_id_does_not_break_the_server(server):
    """A request id holding a lone surrogate gets a reply (bad_request), the connection stays open, the server runs on."""
    url, _, _ = server
    async with session(url, "alice") as client:
        with trio.fail_after(TIMEOUT):
            await client.ws.send_message('{"type":"ping","id":"\\ud800"}')
        reply = await client.recv()
        assert reply["type"] == "pong" or (reply["type"], reply["code"]) == ("error", "bad_request"), reply
        await client.ping()
    await assert_server_alive(url)


@pytest.mark.parametrize("filt", ['{"actor":"\\ud800"}', '{"stream":"order:\\udfff"}', '{"types":["\\ud800"]}',
                                  '{"order_id":"\\ud83d"}'])
async def test_lone_surrogate_in_query_filter_is_bad_request(server, filt):
    """A query filter string holding a lone surrogate is `bad_request`; the server runs on."""
    url, _, _ = server
    async with session(url, "audit-1", "auditor") as client:
        with trio.fail_after(TIMEOUT):
            await client.ws.send_message('{"type":"query","id":"q","filter":%s}' % filt)
        reply = await client.recv()
        assert (reply["type"], reply.get("code"), reply.get("id")) == ("error", "bad_request", "q"), reply
        await client.ping()
    await assert_server_alive(url)


async def test_lone_surrogate_in_command_data_is_bad_request_and_spares_other_commands(server):
    """A command whose data holds a lone surrogate is `bad_request`, and a valid command right behind it is acked."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff:
        with trio.fail_after(TIMEOUT):
            await staff.ws.send_message('{"type":"command","id":"bad","name":"add_stock",'
                                        '"data":{"sku":"s","quantity":1,"name":"\\ud800"}}')
        await staff.send({"type": "command", "id": "good", "name": "add_stock", "data": {"sku": "s", "quantity": 2}})
        bad, good = await staff.reply_to("bad"), await staff.reply_to("good")
        assert (bad["type"], bad.get("code")) == ("error", "bad_request"), bad
        assert good["type"] == "ack", good
    await assert_server_alive(url)


# -- get -----------------------------------------------------------------------------------------


async def test_get_order_and_stock_shapes(server):
    """`get` answers the order and stock shapes of docs/protocol.md section 4, or not_found."""
    url, _, _ = server
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice:
        await staff.ok("add_stock", data={"sku": "kibble", "quantity": 10, "name": "Kibble 5 kg"})
        await staff.ok("add_stock", data={"sku": "kibble", "quantity": 5})
        ack = await alice.ok("place_order", "o1", {"items": [{"sku": "kibble", "quantity": 3}], "ship_to": "1 Main St"})
        reply = await alice.request({"type": "get", "order_id": "o1", "id": "g1"})
        assert (reply["type"], reply["id"]) == ("order", "g1")
        order = reply["order"]
        assert set(order) == {"order_id", "customer", "status", "items", "ship_to", "note", "version",
                              "created_at", "updated_at", "last_seq"}
        assert order["order_id"] == "o1" and order["customer"] == "alice" and order["status"] == "placed"
        assert order["items"] == [{"sku": "kibble", "quantity": 3}]
        assert (order["ship_to"], order["note"], order["version"], order["last_seq"]) == ("1 Main St", None, 1, ack["seq"] - 1)
        assert RFC3339_Z.match(order["created_at"]) and order["created_at"] == order["updated_at"]
        update = await alice.ok("update_order", "o1", {"note": "back door"})
        order = (await staff.request({"type": "get", "order_id": "o1"}))["order"]
        assert (order["note"], order["ship_to"], order["version"], order["last_seq"]) == ("back door", "1 Main St", 2, update["seq"])
        assert order["updated_at"] >= order["created_at"]
        reply = await alice.request({"type": "get", "sku": "kibble", "id": "g2"})
        assert (reply["type"], reply["id"]) == ("stock", "g2")
        assert reply["stock"] == {"sku": "kibble", "name": "Kibble 5 kg", "available": 12, "reserved": 3,
                                  "version": 3, "last_seq": ack["seq"]}
        for message in ({"type": "get", "order_id": "nope"}, {"type": "get", "sku": "nope"}):
            reply = await alice.request(message)
            assert (reply["type"], reply["code"]) == ("error", "not_found")
        async with session(url, "audit-1", "auditor") as auditor:
            assert (await auditor.request({"type": "get", "order_id": "o1"}))["order"] == order


# -- query ---------------------------------------------------------------------------------------


async def build_history(url: str) -> None:
    """A small log with two customers, every command type and a few time gaps."""
    async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, \
            session(url, "bob") as bob:
        await staff.ok("add_stock", data={"sku": "kibble", "quantity": 100, "name": "Kibble"})
        await staff.ok("add_stock", data={"sku": "toy", "quantity": 50})
        await alice.ok("place_order", "a1", {"items": [{"sku": "kibble", "quantity": 2}, {"sku": "toy", "quantity": 1}],
                                             "ship_to": "1 Main St"})
        await trio.sleep(0.01)
        await bob.ok("place_order", "b1", {"items": [{"sku": "kibble", "quantity": 5}]})
        await staff.ok("approve_order", "a1")
        await staff.ok("ship_order", "a1", {"carrier": "UPS"})
        await trio.sleep(0.01)
        await bob.ok("cancel_order", "b1", {"reason": "too expensive"})
        await alice.ok("place_order", "a2", {"items": [{"sku": "toy", "quantity": 3}]})
        await alice.ok("update_order", "a2", {"note": "leave at the door"})
        await trio.sleep(0.01)
        await staff.ok("deliver_order", "a1")
        await staff.ok("add_stock", data={"sku": "kibble", "quantity": 1})


def parse_at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def plus_two(moment: datetime) -> str:
    spec = "microseconds" if moment.microsecond % 1000 else "milliseconds"
    return moment.astimezone(timezone(timedelta(hours=2))).isoformat(timespec=spec)


async def test_query_filters_match_the_log(server, tmp_path):
    """`query` filters (stream, order_id, types, actor, after, until, from/to_time) select exactly the matching events."""
    url, _, settings = server
    await build_history(url)
    async with session(url, "staff-1", "staff") as staff, session(url, "audit-1", "auditor") as auditor:
        full = await staff.request({"type": "query", "limit": 1000})
        assert full["type"] == "result" and full["next"] is None
        events = full["events"]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)) and len(events) == 18
        assert all(set(e) == EVENT_KEYS for e in events)
        # The same as the log itself.
        store = Store.open(settings.db, readonly=True)
        try:
            assert [e.hash for e in store.read_events(limit=None)] == [e["hash"] for e in events]
        finally:
            store.close()
        assert (await auditor.request({"type": "query", "limit": 1000}))["events"] == events

        middle = parse_at(events[9]["at"])
        cases = [
            ({"stream": "order:a1"}, lambda e: e["stream"] == "order:a1"),
            ({"stream": "sku:toy"}, lambda e: e["stream"] == "sku:toy"),
            ({"order_id": "a1"}, lambda e: e["stream"] == "order:a1" or e["data"].get("order_id") == "a1"),
            ({"order_id": "b1"}, lambda e: e["stream"] == "order:b1" or e["data"].get("order_id") == "b1"),
            ({"types": ["order-created", "order-cancelled"]}, lambda e: e["type"] in ("order-created", "order-cancelled")),
            ({"types": []}, lambda e: False),
            ({"actor": "bob"}, lambda e: e["actor"] == "bob"),
            ({"actor": "nobody"}, lambda e: False),
            ({"after": 7}, lambda e: e["seq"] > 7),
            ({"until": 7}, lambda e: e["seq"] <= 7),
            ({"after": 3, "until": 12, "types": ["stock-reserved"]},
             lambda e: 3 < e["seq"] <= 12 and e["type"] == "stock-reserved"),
            ({"from_time": plus_two(middle)}, lambda e: parse_at(e["at"]) >= middle),
            ({"to_time": plus_two(middle)}, lambda e: parse_at(e["at"]) < middle),
            ({"from_time": plus_two(middle), "to_time": plus_two(middle)}, lambda e: False),
            ({"from_time": plus_two(middle - timedelta(microseconds=500))},
             lambda e: parse_at(e["at"]) >= middle - timedelta(microseconds=500)),
            ({"to_time": plus_two(middle + timedelta(milliseconds=1)), "actor": "staff-1"},
             lambda e: parse_at(e["at"]) < middle + timedelta(milliseconds=1) and e["actor"] == "staff-1"),
            ({"from_time": "2000-01-01T00:00:00Z", "to_time": "2999-01-01T00:00:00+02:00"}, lambda e: True),
        ]
        for filt, predicate in cases:
            expected = [e for e in events if predicate(e)]
            for client in (staff, auditor):
                reply = await client.request({"type": "query", "filter": filt, "limit": 1000})
                assert reply["type"] == "result", (filt, reply)
                assert reply["events"] == expected, filt
                assert reply["next"] is None
        for bad in ("2026-11-25T10:00:00", "2026-11-25 10:00", "25/11/2026", "2026-11-25T10:00:00+2:00"):
            reply = await staff.request({"type": "query", "filter": {"from_time": bad}})
            assert reply["code"] == "bad_request", bad


async def test_query_paging_with_next(server):
    """Paging with `next` as `after` reproduces one big query; `next` is null iff no later event matches."""
    url, _, _ = server
    await build_history(url)
    async with session(url, "audit-1", "auditor") as client:
        filters = [{}, {"types": ["order-created"]}, {"stream": "sku:kibble"}, {"actor": "alice"},
                   {"order_id": "a1"}, {"types": ["order-delivered"]}, {"types": ["nothing"]}, {"until": 6}]
        for filt in filters:
            everything = (await client.request({"type": "query", "filter": filt, "limit": 1000}))["events"]
            for limit in (1, 2, 3):
                got, after, pages = [], None, 0
                while True:
                    page_filter = dict(filt) if after is None else {**filt, "after": after}
                    reply = await client.request({"type": "query", "filter": page_filter, "limit": limit})
                    assert reply["type"] == "result" and len(reply["events"]) <= limit
                    got.extend(reply["events"])
                    pages += 1
                    later = [e for e in everything if e["seq"] > (got[-1]["seq"] if got else 0)]
                    assert (reply["next"] is None) == (not later), (filt, limit, reply)
                    if reply["next"] is None:
                        break
                    assert reply["next"] == got[-1]["seq"]
                    after = reply["next"]
                    assert pages < 100
                assert got == everything, (filt, limit)
        # The default limit is 100.
        assert len((await client.request({"type": "query"}))["events"]) == 18


async def test_query_is_forbidden_to_customers(server):
    """`query` is for staff and auditors: a customer gets `forbidden`."""
    url, _, _ = server
    async with session(url, "alice") as alice:
        for message in ({"type": "query"}, {"type": "query", "filter": {"actor": "alice"}, "limit": 5}):
            await expect_error(alice, message, "forbidden")


# -- shutdown ------------------------------------------------------------------------------------


async def test_stop_closes_every_connection_with_1001(tmp_path):
    """On stop the server closes authenticated and not yet authenticated connections with 1001."""
    stop = trio.Event()
    async with running_server(tmp_path, stop=stop) as (url, _, _):
        async with session(url, "staff-1", "staff") as staff, session(url, "alice") as alice, connect(url) as bare:
            await staff.subscribe("orders", 0)
            await alice.ping()
            await trio.sleep(0.05)  # let the bare connection reach the server
            stop.set()
            for ws in (staff.ws, alice.ws, bare):
                code, _ = await expect_close(ws, timeout=8)
                assert code == 1001


def _stderr_lines(chunks: list[bytes]) -> list[str]:
    return b"".join(chunks).decode(errors="replace").splitlines()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_exits_0_and_loses_nothing_acked(tmp_path, signum):
    """`orderlog serve` exits 0 within 10 s of SIGTERM/SIGINT amid traffic, and every acked command is in the log."""
    db = tmp_path / "live.db"
    secret = "subprocess-secret-0123456789abcdef"
    env = {k: v for k, v in os.environ.items() if k != "ORDERLOG_DB"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "orderlog.cli", "serve", "--db", str(db), "--port", "0", "--jwt-secret", secret],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
    )
    chunks: list[bytes] = []
    acked: dict[tuple[str, str], dict] = {}
    try:
        async with trio.open_nursery() as nursery:
            listening = trio.Event()
            found: list[str] = []

            async def drain() -> None:
                async for chunk in process.stderr:
                    chunks.append(chunk)
                    if not found:
                        for line in _stderr_lines(chunks):
                            match = re.search(r"event=listening url=(ws://\S+)", line)
                            if match:
                                found.append(match.group(1))
                                listening.set()
                listening.set()  # the process ended before listening: fail below

            nursery.start_soon(drain)
            with trio.fail_after(15):
                await listening.wait()
            assert found, f"no `event=listening url=` line; exit {process.poll()}; stderr:\n" + "\n".join(_stderr_lines(chunks))
            url = found[0]

            async with session(url, "staff-0", "staff", secret=secret) as staff:
                await staff.ok("add_stock", data={"sku": "kibble", "quantity": 1_000_000})

            async def customer(n: int) -> None:
                try:
                    async with session(url, f"cust-{n}", secret=secret) as client:
                        for i in range(10_000):
                            cid = f"c{n}-{i}"
                            reply = await client.command("place_order", f"o-{n}-{i}",
                                                         {"items": [{"sku": "kibble", "quantity": 1}]}, command_id=cid)
                            if reply["type"] == "ack":
                                acked[(f"cust-{n}", cid)] = reply
                except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
                    return

            async with trio.open_nursery() as clients:
                for n in range(4):
                    clients.start_soon(customer, n)
                await trio.sleep(1.0)
                process.send_signal(signum)
                with trio.fail_after(10):
                    code = await process.wait()
                clients.cancel_scope.cancel()
            assert code == 0, "\n".join(_stderr_lines(chunks))
    finally:
        if process.poll() is None:
            process.kill()
            await process.wait()
    assert acked, "no command was acked before the signal"
    store = Store.open(str(db), readonly=True)
    try:
        events = store.read_events(limit=None)
    finally:
        store.close()
    by_command = {}
    for event in events:
        by_command.setdefault((event.actor, event.command_id), []).append(event)
    for key, ack in acked.items():
        assert key in by_command, f"acked command {key} is not in the log"
        assert by_command[key][-1].seq == ack["seq"]
        assert [e.type for e in by_command[key]] == ack["events"]
