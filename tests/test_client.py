"""orderlog.client against a real server that is stopped and started again on the same port and file."""

from __future__ import annotations

import json
import socket
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio

from orderlog.auth import Keys
from orderlog.client import AuthenticationFailed, OrderlogError, connect
from orderlog.domain import Command, Principal
from orderlog.service.server import serve
from orderlog.service.settings import Settings
from orderlog.records import Request
from orderlog.store import Store
from wsclient import SECRET, TIMEOUT, token

FAST = {"backoff_start": 0.05, "backoff_cap": 0.2}  # reconnect quickly in tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def server_on(db: Path, port: int) -> AsyncIterator[str]:
    """The real server on a fixed port (so that it can come back where it was); yields its URL."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            url = await nursery.start(lambda task_status: serve(
                Settings(db=str(db), port=port, keys=Keys("HS256", SECRET)), stop=stop, handle_signals=False,
                task_status=task_status))
        try:
            yield url
        finally:
            stop.set()


def place_directly(db: Path, user: str, order_id: str) -> int:
    """Place an order through the store's command path while no server runs; returns its seq."""
    store = Store.open(str(db))
    try:
        command = Command("place_order", uuid.uuid4().hex, order_id, data={"items": [{"sku": "kibble", "quantity": 1}]})
        [ack] = store.execute_batch([Request(Principal(user, "customer"), command, "2026-11-25T17:00:00.000Z")]).outcomes
        return ack.seq
    finally:
        store.close()


async def stock(url: str, quantity: int = 50) -> None:
    async with connect(url, token("s1", "staff"), **FAST) as client:
        await client.command("add_stock", data={"sku": "kibble", "quantity": quantity})


async def next_events(events, count: int) -> list[dict]:
    with trio.fail_after(TIMEOUT):
        return [await events.__anext__() for _ in range(count)]


async def server_twice(db: Path, port: int, stopped: trio.Event, restarted: trio.Event, order_id: str) -> None:
    """Serve until `stopped`, write an order while down, then serve again (`restarted`) on the same port."""
    async with server_on(db, port):
        await stopped.wait()
    place_directly(db, "carol", order_id)
    async with server_on(db, port):
        restarted.set()
        await trio.sleep_forever()


async def test_resumes_after_a_restart_without_gap_or_duplicate(tmp_path: Path) -> None:
    """After the server restarts, a subscription gets exactly the events it missed and reports the resume."""
    db, port = tmp_path / "orderlog.db", free_port()
    notes: list[str] = []
    async with server_on(db, port) as url:
        await stock(url)
    async with trio.open_nursery() as nursery:
        stopped, restarted = trio.Event(), trio.Event()

        nursery.start_soon(server_twice, db, port, stopped, restarted, "o-while-down")
        await trio.sleep(0.2)
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", token("s1", "staff"), on_status=notes.append,
                           **FAST) as client:
            events = client.subscribe("orders", since=0).__aiter__()
            await client.command("place_order", order_id="o-before", data={"items": [{"sku": "kibble", "quantity": 1}]})
            [before] = await next_events(events, 1)
            assert before["stream"] == "order:o-before"
            stopped.set()
            with trio.fail_after(TIMEOUT):
                await restarted.wait()
            ack = await client.command("place_order", order_id="o-after", data={"items": [{"sku": "kibble", "quantity": 1}]})
            got = await next_events(events, 2)
            assert [e["stream"] for e in got] == ["order:o-while-down", "order:o-after"]
            assert got[0]["prev"] == before["seq"] and got[1]["prev"] == got[0]["seq"]
            assert got[1]["seq"] == ack["seq"] - 1  # order-created, then stock-reserved (the ack's seq)
            assert f"resumed orders from seq {before['seq']}" in notes
            assert any(note.startswith("reconnecting in") for note in notes)
        nursery.cancel_scope.cancel()


async def test_live_only_subscription_resumes_from_where_it_started(tmp_path: Path) -> None:
    """A subscription without `since` that saw no event yet still gets what happened while it was disconnected."""
    db, port = tmp_path / "orderlog.db", free_port()
    async with server_on(db, port) as url:
        await stock(url)
    async with trio.open_nursery() as nursery:
        stopped, restarted = trio.Event(), trio.Event()

        nursery.start_soon(server_twice, db, port, stopped, restarted, "o-missed")
        await trio.sleep(0.2)
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", token("s1", "staff"), **FAST) as client:
            events = client.subscribe("orders").__aiter__()
            receiving = trio.Event()
            got: list[dict] = []

            async def collect() -> None:
                receiving.set()
                got.append(await events.__anext__())

            async with trio.open_nursery() as inner:
                inner.start_soon(collect)
                await receiving.wait()
                with trio.fail_after(TIMEOUT):  # wait for `subscribed` (its since is where the feed starts)
                    while client._subs["orders"].last is None:
                        await trio.sleep(0.01)
                stopped.set()
                with trio.fail_after(TIMEOUT):
                    await restarted.wait()
            assert [e["stream"] for e in got] == ["order:o-missed"]
        nursery.cancel_scope.cancel()


async def test_command_sent_while_disconnected_is_applied_once(tmp_path: Path) -> None:
    """A command sent while the server is down is resent after the reconnect, with its id, and applied once."""
    db, port = tmp_path / "orderlog.db", free_port()
    async with server_on(db, port) as url:
        await stock(url)
    async with trio.open_nursery() as nursery:
        stopped = trio.Event()
        restart = trio.Event()

        async def server_twice() -> None:
            async with server_on(db, port):
                await stopped.wait()
            await restart.wait()
            async with server_on(db, port):
                await trio.sleep_forever()

        nursery.start_soon(server_twice)
        await trio.sleep(0.2)
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", token("alice"), **FAST) as client:
            stopped.set()
            with trio.fail_after(TIMEOUT):
                while client._ws is not None:
                    await trio.sleep(0.01)
            async with trio.open_nursery() as inner:
                acks: list[dict] = []

                async def send() -> None:
                    acks.append(await client.command("place_order", order_id="o-queued", command_id="c-queued",
                                                     data={"items": [{"sku": "kibble", "quantity": 2}]}))

                inner.start_soon(send)
                await trio.sleep(0.3)
                restart.set()
            with trio.fail_after(TIMEOUT):
                again = await client.command("place_order", order_id="o-queued", command_id="c-queued",
                                             data={"items": [{"sku": "kibble", "quantity": 2}]})
            assert acks[0]["duplicate"] is False and again["duplicate"] is True
            assert again["seq"] == acks[0]["seq"]
            assert (await client.get_stock("kibble"))["reserved"] == 2
        nursery.cancel_scope.cancel()


async def test_refused_token_raises_and_stops(tmp_path: Path) -> None:
    """A token the server refuses (close 4001) raises AuthenticationFailed instead of reconnecting."""
    async with server_on(tmp_path / "orderlog.db", free_port()) as url:
        with trio.fail_after(TIMEOUT), pytest.raises(AuthenticationFailed) as caught:
            async with connect(url, token("alice", secret="not-the-server-secret-0123456789-abc"), **FAST):
                pass
        assert isinstance(caught.value, OrderlogError) and "invalid token" in str(caught.value)


async def test_snapshot_then_resume_after_a_restart(tmp_path: Path) -> None:
    """subscribe(snapshot=True) yields the rows as of N, then the events; after a restart it
    resumes from the last seq (no second snapshot) with what it missed."""
    db, port = tmp_path / "orderlog.db", free_port()
    async with server_on(db, port) as url:
        await stock(url)
        async with connect(url, token("s1", "staff"), **FAST) as client:
            await client.command("place_order", order_id="o-1", data={"items": [{"sku": "kibble", "quantity": 1}]})
    async with trio.open_nursery() as nursery:
        stopped, restarted = trio.Event(), trio.Event()
        nursery.start_soon(server_twice, db, port, stopped, restarted, "o-while-down")
        await trio.sleep(0.2)
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", token("s1", "staff"), **FAST) as client:
            items = client.subscribe("orders", snapshot=True).__aiter__()
            [frame] = await next_events(items, 1)
            assert frame["type"] == "snapshot" and frame["last"] and frame["total"] == 1
            assert [r["order_id"] for r in frame["rows"]] == ["o-1"]
            await client.command("place_order", order_id="o-2", data={"items": [{"sku": "kibble", "quantity": 1}]})
            created = await next_events(items, 1)
            assert created[0]["stream"] == "order:o-2" and created[0]["prev"] == frame["seq"]
            stopped.set()
            with trio.fail_after(TIMEOUT):
                await restarted.wait()
            got = await next_events(items, 1)
            assert got[0]["stream"] == "order:o-while-down" and got[0]["prev"] == created[0]["seq"]
        nursery.cancel_scope.cancel()


async def test_tail_snapshot_prints_the_rows_then_the_events(tmp_path: Path) -> None:
    """`orderlog tail --snapshot` prints {"stock": ROW} lines first, then the events after them."""
    from orderlog.client import tail

    db, port = tmp_path / "orderlog.db", free_port()
    async with server_on(db, port) as url:
        await stock(url)
        lines: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tail, url, token("a", "auditor"), "inventory", None, lines.append, lambda _: None, 1, True)
            with trio.fail_after(TIMEOUT):
                while not lines:
                    await trio.sleep(0.01)
            await stock(url, 5)
        first, event = map(json.loads, lines)
        assert first == {"stock": {"sku": "kibble", "name": None, "available": 50, "reserved": 0, "version": 1,
                                   "last_seq": 1}}
        assert event["type"] == "stock-added" and event["prev"] == 1 and event["data"]["quantity"] == 5


TTL = 4.0  # seconds: the tokens of the provider test (refreshed 0.8 s before expiry; the sweep checks every 0.25 s)


async def test_a_token_provider_refreshes_in_band_and_reconnects_after_expiry_with_a_fresh_token(tmp_path: Path) -> None:
    """A short-lived token from a (sync) provider is refreshed in band, so the connection outlives
    it; after a restart that comes once the last token expired, the client connects with a fresh
    one and resumes without gap."""
    import time

    db, port = tmp_path / "orderlog.db", free_port()
    notes: list[str] = []
    issued: list[float] = []

    def provider() -> str:
        issued.append(time.time())
        return token("s1", "staff", ttl=TTL)

    async with server_on(db, port) as url:
        await stock(url)
    async with trio.open_nursery() as nursery:
        stopped, restart = trio.Event(), trio.Event()

        async def server_twice() -> None:
            async with server_on(db, port):
                await stopped.wait()
            place_directly(db, "carol", "o-while-down")
            await restart.wait()
            async with server_on(db, port):
                await trio.sleep_forever()

        nursery.start_soon(server_twice)
        await trio.sleep(0.2)
        async with connect(f"ws://127.0.0.1:{port}/v1/ws", provider, on_status=notes.append, **FAST) as client:
            events = client.subscribe("orders", since=0).__aiter__()
            await trio.sleep(TTL * 1.5)  # beyond the first token's life, on one connection
            assert len(issued) >= 2 and not any(n.startswith("disconnected") for n in notes), notes
            assert any(n.startswith("token refreshed") for n in notes)
            await client.command("place_order", order_id="o-1", data={"items": [{"sku": "kibble", "quantity": 1}]})
            [first] = await next_events(events, 1)
            stopped.set()
            await trio.sleep(TTL + 0.5)  # every token issued so far has expired
            expired_before = len(issued)
            restart.set()
            [missed] = await next_events(events, 1)
            assert missed["stream"] == "order:o-while-down" and missed["prev"] == first["seq"]
            assert len(issued) > expired_before
        nursery.cancel_scope.cancel()


async def test_a_failing_token_provider_raises_token_unavailable(tmp_path: Path) -> None:
    """A provider that fails before the first connect raises TokenUnavailable with its reason (async providers too)."""
    from orderlog.client import TokenUnavailable

    async def broken() -> str:
        raise RuntimeError("the vault is sealed")

    async with server_on(tmp_path / "orderlog.db", free_port()) as url:
        with trio.fail_after(TIMEOUT), pytest.raises(TokenUnavailable, match="the vault is sealed"):
            async with connect(url, broken, **FAST):
                pass
        with trio.fail_after(TIMEOUT), pytest.raises(TokenUnavailable, match="returned NoneType, not a token"):
            async with connect(url, lambda: None, **FAST):
                pass
