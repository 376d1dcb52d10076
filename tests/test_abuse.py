"""Abuse: clients that hold on without finishing, crowd in, never read, flood, or simply come in
thousands. None of them may take the service down or slow the others beyond noise.

Slow handshakes and the connection cap run on an in-process server (their settings are not
flags); memory, floods and 2,000 connections on `orderlog serve` subprocesses, so the server's
RSS and CPU are its own.
"""

from __future__ import annotations

import random
import resource
import statistics
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from conftest import cli_env
from test_crash import ServerProcess
from wsclient import (
    TIMEOUT,
    connect,
    expect_close,
    next_id,
    raw_connection,
    recv_json,
    running_server,
    send_json,
    session,
    token,
)


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


# -- slow handshakes ------------------------------------------------------------------------------

HANDSHAKE_TIMEOUT = 0.5


async def _drip(url: str, head: bytes, every: float) -> float:
    """Send `head` one byte every `every` seconds; return how long until the server hung up."""
    parts = urlsplit(url)
    started = trio.current_time()
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        with trio.fail_after(HANDSHAKE_TIMEOUT + TIMEOUT):
            for i in range(len(head)):
                try:
                    await stream.send_all(head[i:i + 1])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return trio.current_time() - started
                with trio.move_on_after(every):
                    try:
                        data = await stream.receive_some(4096)
                    except trio.BrokenResourceError:
                        data = b""
                    if not data or b"408" in data or b"HTTP/1.1" in data:
                        return trio.current_time() - started
            # The whole head went out (it is longer than the timeout allows only if `every` is small).
            while await stream.receive_some(4096):
                pass
    return trio.current_time() - started


async def test_slow_handshakes_are_dropped_after_the_handshake_timeout(tmp_path):
    """Slowloris connections (a partial HTTP head dripped byte by byte, or nothing at all) are dropped after the
    handshake timeout, many at once, while a normal client connects and works meanwhile."""
    async with running_server(tmp_path, handshake_timeout=HANDSHAKE_TIMEOUT) as (url, _, _):
        parts = urlsplit(url)
        head = (f"GET /v1/ws?token={token('slow')} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Padding: " + "p" * 200).encode()
        held: list[float] = []

        async def one(every: float) -> None:
            held.append(await _drip(url, head, every))

        async def silent() -> None:
            started = trio.current_time()
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
            async with stream:
                with trio.fail_after(HANDSHAKE_TIMEOUT + TIMEOUT):
                    while await stream.receive_some(4096):
                        pass
            held.append(trio.current_time() - started)

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, 0.05 + 0.01 * (i % 5))
            for _ in range(10):
                nursery.start_soon(silent)
            await trio.sleep(0.1)
            async with session(url, "normal") as normal:  # the door is still open to others
                assert (await normal.ping())["type"] == "pong"
        assert len(held) == 50
        assert all(HANDSHAKE_TIMEOUT * 0.8 <= h <= HANDSHAKE_TIMEOUT + 2.0 for h in held), sorted(held)


async def test_slow_websocket_handshake_after_a_complete_head_is_dropped_too(tmp_path):
    """A client that sends a complete upgrade head and then stalls before reading the answer, or an authless client
    that never sends its auth message, is closed in bounded time."""
    async with running_server(tmp_path, handshake_timeout=HANDSHAKE_TIMEOUT, auth_timeout=0.5) as (url, _, _):
        async with connect(url) as ws:  # no token, no auth message
            assert await expect_close(ws) == (4001, "authentication timeout")


# -- the connection cap ---------------------------------------------------------------------------


async def test_max_connections_holds_with_503(tmp_path):
    """With max_connections 5 (one slot for handshakes, four for authenticated connections): while the
    handshake slot is held, handshake N+1 gets HTTP 503; while the four user slots are held, a login is closed
    with 1013 `server busy`; and one more fits after one leaves."""
    cap = 5
    async with running_server(tmp_path, max_connections=cap) as (url, _, _):
        async with trio.open_nursery() as nursery:
            leave = [trio.Event() for _ in range(cap)]

            async def hold(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
                async with session(url, f"u{i}") as client:
                    assert (await client.ping())["type"] == "pong"
                    task_status.started()
                    await leave[i].wait()

            async def hold_handshake(task_status=trio.TASK_STATUS_IGNORED) -> None:
                async with connect(url):  # no token, no auth message: it stays a handshake
                    task_status.started()
                    await leave[-1].wait()

            for i in range(cap - 1):
                await nursery.start(hold, i)
            await nursery.start(hold_handshake)
            for _ in range(3):
                with pytest.raises(ConnectionRejected) as refused:
                    async with connect(url, token("extra")):
                        pass
                assert refused.value.status_code == 503
            leave[-1].set()

            async def login(user: str) -> tuple[int, str] | str:
                """A login once the handshake slot is free again: "ok" or its close."""
                with trio.fail_after(TIMEOUT):
                    while True:  # the server notices the close a moment later
                        try:
                            async with connect(url, token(user)) as ws:
                                first = await recv_json(ws)
                                if first["type"] == "welcome":
                                    return "ok"
                        except ConnectionRejected as exc:
                            assert exc.status_code == 503
                            await trio.sleep(0.05)
                        except ConnectionClosed as exc:
                            return exc.reason.code, exc.reason.reason

            assert await login("extra") == (1013, "server busy")
            leave[0].set()
            with trio.fail_after(TIMEOUT):
                while (outcome := await login("late")) != "ok":
                    assert outcome == (1013, "server busy")
                    await trio.sleep(0.05)
            for event in leave:
                event.set()


# -- a client that never reads ----------------------------------------------------------------------

SEED_COMMANDS = 40_000  # about 72k events, 38k of them on order streams (about 14 MB of frames)
NON_READERS = 6
RSS_GROWTH_LIMIT_MIB = 60  # buffering what the non-readers are owed would take several hundred MiB


@pytest.fixture(scope="module")
def big_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("abuse") / "big.db"
    done = subprocess.run([sys.executable, "-m", "orderlog.cli", "seed", "--db", str(path), "--commands",
                           str(SEED_COMMANDS), "--seed", "3"], env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return path


async def test_clients_that_never_read_keep_server_memory_bounded(big_log, tmp_path):
    """Non-reading clients subscribed to orders since 0 on a big log, while more events are appended, leave the
    server's RSS bounded; a reading client next to them gets its whole replay, and a stalled one catches up in order
    once it reads."""
    db = tmp_path / "big.db"
    db.write_bytes(big_log.read_bytes())
    with ServerProcess(db, "--rate-limit", "100000", "--user-rate-limit", "100000") as server:
        url = server.wait_url()
        with trio.fail_after(100):
            async with session(url, "warm", "staff", queue=100_000) as warm:  # warm the caches: one full replay
                sub = await warm.subscribe("orders", since=0)
                head = sub["head"]
                replay, _ = await warm.live("orders", timeout=60)
            base = server.rss_kib()
            peak = base
            async with trio.open_nursery() as nursery:
                stalled = []

                async def never_read(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
                    async with raw_connection(url, token(f"staff-{i}", "staff"), rcvbuf=4096, queue=1) as (ws, _):
                        stalled.append(ws)
                        await send_json(ws, {"type": "subscribe", "id": "s", "channel": "orders", "since": 0})
                        task_status.started()
                        await trio.sleep_forever()

                for i in range(NON_READERS):
                    await nursery.start(never_read, i)
                # More events while they stall: 4,000 add_stock commands, pipelined.
                async with session(url, "writer", "staff") as writer:
                    for batch in range(20):
                        ids = []
                        for j in range(200):
                            ids.append(next_id("w"))
                            await writer.send({"type": "command", "id": ids[-1], "name": "add_stock",
                                               "data": {"sku": f"sku-{j % 7}", "quantity": 1}})
                        for request_id in ids:
                            reply = await writer.reply_to(request_id, timeout=20)
                            assert reply["type"] == "ack", reply
                        peak = max(peak, server.rss_kib())
                for _ in range(15):
                    await trio.sleep(0.2)
                    peak = max(peak, server.rss_kib())
                # A reader next to them is served: the recent part of the log, then live.
                async with session(url, "reader", "staff", queue=100_000) as reader:
                    since = replay[-2000]["seq"]
                    await reader.subscribe("orders", since=since)
                    recent, _ = await reader.live("orders", timeout=30)
                    assert [e["seq"] for e in recent][:1999] == [e["seq"] for e in replay[-1999:]]
                    expected_total = len(replay) + len(recent) - 1999
                peak = max(peak, server.rss_kib())
                nursery.cancel_scope.cancel()
            assert server.proc.poll() is None, f"the server died: {server.stderr[-5000:]}"
            growth = (peak - base) / 1024
            print(f"server RSS: {base / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB with {NON_READERS} "
                  f"non-readers owed {len(replay)}+ events each (growth {growth:.1f} MiB)")
            assert growth < RSS_GROWTH_LIMIT_MIB, (base, peak)
            # A stalled subscriber that starts reading gets everything, in order, with no gap.
            async with raw_connection(url, token("late-reader", "staff"), rcvbuf=4096, queue=1) as (ws, _):
                await send_json(ws, {"type": "subscribe", "id": "s", "channel": "orders", "since": 0})
                await trio.sleep(1.0)  # stalled for a while
                prev, count = 0, 0
                with trio.fail_after(60):
                    while True:
                        frame = await recv_json(ws, timeout=20)
                        if frame["type"] == "live":
                            break
                        if frame["type"] in ("subscribed", "welcome"):
                            continue
                        assert frame["prev"] == prev, (frame["prev"], prev)
                        prev, count = frame["seq"], count + 1
                assert count == expected_total
        assert server.stop() == 0


# -- command floods ------------------------------------------------------------------------------


async def _timed_acks(url: str, user: str, seconds: float, samples: list[float]) -> None:
    async with session(url, user) as client:
        deadline = trio.current_time() + seconds
        n = 0
        while trio.current_time() < deadline:
            n += 1
            started = time.perf_counter()
            reply = await client.command("place_order", f"{user}-{n}-{random.random():.6f}",
                                         {"items": [{"sku": "kibble", "quantity": 1}]})
            samples.append(time.perf_counter() - started)
            assert reply["type"] == "ack", reply
            await trio.sleep(0.01)


async def test_command_flood_is_rate_limited_and_slows_nobody(tmp_path):
    """A connection flooding commands gets rate_limited beyond its burst, and other clients' acks stay as fast as
    without the flood (within noise)."""
    with ServerProcess(tmp_path / "flood.db", "--rate-limit", "200") as server:
        url = server.wait_url()
        with trio.fail_after(90):
            async with session(url, "s1", "staff") as staff:
                await staff.ok("add_stock", data={"sku": "kibble", "quantity": 10_000_000})
            alone: list[float] = []
            await _timed_acks(url, "calm-0", 1.5, alone)
            during: list[float] = []
            codes: dict[str, int] = {}

            async def flood() -> None:
                async with connect(url, token("flooder"), queue=100_000) as ws:
                    assert (await recv_json(ws))["type"] == "welcome"
                    sent = 0

                    async def reader() -> None:
                        for _ in range(sent_total):
                            reply = await recv_json(ws, timeout=30)
                            key = reply["type"] if reply["type"] == "ack" else reply["code"]
                            codes[key] = codes.get(key, 0) + 1

                    sent_total = 6_000
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(reader)
                        for i in range(sent_total):
                            await ws.send_message(f'{{"type":"command","id":"f{i}","name":"place_order",'
                                                  f'"order_id":"flood-{i}","data":{{"items":[{{"sku":"kibble",'
                                                  f'"quantity":1}}]}}}}')
                            sent += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await trio.sleep(0.05)
                for i in range(2):
                    nursery.start_soon(_timed_acks, url, f"calm-{i + 1}", 2.5, during)
        a50, d50 = statistics.median(alone), statistics.median(during)
        a95 = sorted(alone)[int(len(alone) * 0.95)]
        d95 = sorted(during)[int(len(during) * 0.95)]
        print(f"flood replies: {codes}; calm acks alone p50 {a50 * 1000:.1f} ms p95 {a95 * 1000:.1f} ms, "
              f"during the flood p50 {d50 * 1000:.1f} ms p95 {d95 * 1000:.1f} ms")
        assert codes.get("rate_limited", 0) >= 3_000 and set(codes) <= {"ack", "rate_limited"}, codes
        # The burst (two seconds' worth of the rate: 400), then 200 per second while the flood lasts.
        assert 400 <= codes["ack"] < 3_000, codes
        # Generous: the flooder runs in this process too, so the calm clients share its interpreter.
        assert d50 <= 4 * a50 + 0.015 and d95 <= 5 * a95 + 0.150, (alone, during)
        assert server.stop() == 0


# -- thousands of connections ---------------------------------------------------------------------

FAN_OUT = 2_000


async def test_two_thousand_connections_authenticate_and_all_get_a_broadcast(tmp_path):
    """2,000 concurrent connections each authenticate and get welcome, subscribe to inventory, and one stock event
    then reaches every one of them."""
    _raise_nofile(2 * FAN_OUT + 500)
    with ServerProcess(tmp_path / "fan.db") as server:
        url = server.wait_url()
        welcomed = subscribed = reached = 0
        all_subscribed = trio.Event()
        broadcast_seq: list[int] = []
        seen_seqs: list[int] = []
        released = trio.Event()
        started = time.monotonic()

        async def member(i: int, limiter: trio.CapacityLimiter) -> None:
            nonlocal welcomed, subscribed, reached
            await limiter.acquire()  # bound the handshakes in flight, not the connections held
            holding = True
            try:
                async with connect(url, token(f"fan-{i}"), queue=16) as ws:
                    assert (await recv_json(ws, timeout=60))["type"] == "welcome"
                    welcomed += 1
                    limiter.release()
                    holding = False
                    await send_json(ws, {"type": "subscribe", "id": "s", "channel": "inventory"})
                    reply = await recv_json(ws, timeout=60)
                    assert reply["type"] == "subscribed", reply
                    subscribed += 1
                    if subscribed == FAN_OUT:
                        all_subscribed.set()
                    while True:
                        frame = await recv_json(ws, timeout=60)
                        if frame["type"] == "stock-added":
                            seen_seqs.append(frame["seq"])  # the ack may come after the event: compare later
                            reached += 1
                            break
                    await released.wait()
            finally:
                if holding:
                    limiter.release()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                limiter = trio.CapacityLimiter(64)
                for i in range(FAN_OUT):
                    nursery.start_soon(member, i, limiter)
                await all_subscribed.wait()
                connected_in = time.monotonic() - started
                rss = server.rss_kib()
                async with session(url, "s1", "staff") as staff:
                    ack = await staff.ok("add_stock", data={"sku": "fan", "quantity": 1})
                    broadcast_seq.append(ack["seq"])
                    sent_at = time.monotonic()
                    while reached < FAN_OUT:
                        await trio.sleep(0.02)
                    fanned_in = time.monotonic() - sent_at
                released.set()
        print(f"{FAN_OUT} connections welcomed and subscribed in {connected_in:.1f} s (server RSS {rss / 1024:.0f} MiB); "
              f"one event reached all of them in {fanned_in * 1000:.0f} ms")
        assert welcomed == reached == FAN_OUT
        assert set(seen_seqs) == set(broadcast_seq), (set(seen_seqs), broadcast_seq)
        assert server.stop() == 0
